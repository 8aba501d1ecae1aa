package loader

import (
	"reflect"
	"slices"
	"testing"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/maps"
)

// The hand-written name lists (names.go) hold every field of bpf2go's structs, in order,
// each under its own `ebpf` tag; and the program table attaches every program.
func TestNameListsMatchGenerated(t *testing.T) {
	var m maps.Maps
	checkFields(t, &m, mapFields(&m))
	var p bpf.DivertPrograms
	checkFields(t, &p, programFields(&p))

	// divert_sk_lookup_static is divert_sk_lookup for kernels that refuse the other
	// (node.go): loaded in its place, attached under its name.
	inTable := []string{skLookupStatic}
	for _, pr := range programs {
		inTable = append(inTable, pr.name)
	}
	slices.Sort(inTable)
	var generated []string
	for _, f := range programFields(&p) {
		generated = append(generated, f.name)
	}
	if !slices.Equal(inTable, generated) {
		t.Errorf("the program table has %v, bpf2go generated %v", inTable, generated)
	}
}

func checkFields[T any](t *testing.T, structPtr any, list []field[T]) {
	t.Helper()
	v := reflect.ValueOf(structPtr).Elem()
	if len(list) != v.NumField() {
		t.Errorf("%s has %d fields, the list %d", v.Type(), v.NumField(), len(list))
	}
	for i := range min(len(list), v.NumField()) {
		tag := v.Type().Field(i).Tag.Get("ebpf")
		if list[i].name != tag || any(list[i].ptr) != v.Field(i).Addr().Interface() {
			t.Errorf("%s field %d is %s `ebpf:%q`; the list has %q at that place, or for another field", v.Type(), i, v.Type().Field(i).Name, tag, list[i].name)
		}
	}
}

// The loader's slot sizes are bpf/types.h's MAX_SLOTS and LISTENER_SLOTS.
func TestSlotSizesMatchC(t *testing.T) {
	spec, err := parsedSpec()
	if err != nil {
		t.Fatal(err)
	}
	if got := spec.Maps["slot_config_map"].MaxEntries; got != maxSlots {
		t.Errorf("MAX_SLOTS is %d, maxSlots %d", got, maxSlots)
	}
	if got := spec.Maps["node_listeners"].MaxEntries; got != maxSlots*listenerSlots {
		t.Errorf("node_listeners holds %d, want maxSlots*listenerSlots = %d", got, maxSlots*listenerSlots)
	}
}
