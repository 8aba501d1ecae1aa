package loader

import (
	"math/rand/v2"
	"reflect"
	"regexp"
	"slices"
	"strings"
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

// validID and validPodName accept exactly what these regexps (their specification) match:
// every short string over an alphabet of each class, the length limits, and random strings.
func TestNameChecksMatchTheirRegexps(t *testing.T) {
	id := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`)
	podName := regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$`)
	check := func(s string) {
		if got, want := validID(s), id.MatchString(s); got != want {
			t.Errorf("validID(%q) = %v, the regexp says %v", s, got, want)
		}
		if got, want := validPodName(s), podName.MatchString(s); got != want {
			t.Errorf("validPodName(%q) = %v, the regexp says %v", s, got, want)
		}
	}
	const alphabet = "aZ9_-./\x00é"
	var all func(prefix string, n int)
	all = func(prefix string, n int) {
		check(prefix)
		if n == 0 {
			return
		}
		for _, c := range []byte(alphabet) {
			all(prefix+string(c), n-1)
		}
	}
	all("", 4)
	for _, n := range []int{61, 62, 63, 64, 127, 128, 129, 251, 252, 253, 254} {
		check(strings.Repeat("a", n))
		check(strings.Repeat("a", n) + "/a")
		check("a/" + strings.Repeat("a", n))
		check("a/a" + strings.Repeat(".", n-2) + "a")
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 20000 {
		b := make([]byte, r.IntN(12))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		check(string(b))
	}
}

// fillSlots and growOwnerGids make a slot's maps from sk_lookup's small object, which
// declares every pod map as divert.c's does: a pod in a new slot then parses only that
// object, whoever fills the slots.
func TestPodMapsInSkLookupObject(t *testing.T) {
	big, err := parsedSpec()
	if err != nil {
		t.Fatal(err)
	}
	small, err := skLookupSpec()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range podMapNames {
		b, s := big.Maps[name], small.Maps[name]
		if s == nil {
			t.Errorf("sk_lookup's object has no map %s", name)
			continue
		}
		if b.Type != s.Type || b.KeySize != s.KeySize || b.ValueSize != s.ValueSize || b.MaxEntries != s.MaxEntries || b.Flags != s.Flags {
			t.Errorf("map %s: %+v in sk_lookup's object, %+v in divert.c's", name, s, b)
		}
	}
}
