package loader

import (
	"slices"
	"testing"

	"github.com/cilium/ebpf"
)

// Only kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (Debian's 5.10 does, 6.1 does
// not): there a missing CAP_SYS_RESOURCE is an error, elsewhere nothing to fix.
func TestChargesMemlock(t *testing.T) {
	for release, want := range map[string]bool{
		"5.10.0-35-amd64": true, "4.19.0": true, "5.11.0": false, "5.15.0-generic": false,
		"6.1.0-41-amd64": false, "6.18.44-fc-v1272": false, "10.0": false, "garbage": true,
	} {
		if got := chargesMemlock(release); got != want {
			t.Errorf("chargesMemlock(%q) = %v, want %v", release, got, want)
		}
	}
}

// putInner fills outer maps' slots on every kernel: with one batch update where the kernel
// takes one for an ARRAY_OF_MAPS (6.1 does), else one update per slot (5.10: "not
// supported").
func TestPutInner(t *testing.T) {
	if err := raiseMemlock(); err != nil {
		t.Fatal(err)
	}
	inner := &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	outer, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 4, InnerMap: inner})
	if err != nil {
		t.Fatal(err)
	}
	defer outer.Close()
	var fds []uint32
	want := map[uint32]ebpf.MapID{}
	for _, slot := range []uint32{1, 3} {
		m, err := ebpf.NewMap(inner)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		fds = append(fds, uint32(m.FD()))
		want[slot] = mapID(m)
	}
	_, batchErr := outer.BatchUpdate([]uint32{}, []uint32{}, nil)
	t.Logf("batch update of an ARRAY_OF_MAPS: %v", batchErr)
	if err := putInner(outer, []uint32{1, 3}, fds); err != nil {
		t.Fatal(err)
	}
	for slot, id := range want {
		var got uint32
		if err := outer.Lookup(slot, &got); err != nil || ebpf.MapID(got) != id {
			t.Errorf("slot %d after putInner: map %d, %v; want map %d", slot, got, err, id)
		}
	}
	// innerIDs reads the same entries back, at once, each in its place; 0 where empty.
	var entries []outerEntry
	for slot := range uint32(4) {
		entries = append(entries, outerEntry{outer, "outer", slot})
	}
	ids, err := innerIDs(entries)
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint32{0, uint32(want[1]), 0, uint32(want[3])}; !slices.Equal(ids, want) {
		t.Errorf("innerIDs %v, want %v", ids, want)
	}
	has, err := filledSlots(outer, []uint32{3, 2, 1, 0})
	if err != nil || !slices.Equal(has, []bool{true, false, true, false}) {
		t.Errorf("filledSlots of 3, 2, 1, 0: %v, %v; want true, false, true, false", has, err)
	}
}
