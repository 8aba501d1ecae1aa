package loader

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshdivert/divert/test/testutil"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/meshdivert/divert/bpf"
)

// Every program type, non-map helper and map type divert's compiled programs use is probed,
// so a kernel lacking one is named by Probe instead of failing at load or attach time.
func TestProbeCoversPrograms(t *testing.T) {
	spec, err := bpf.LoadDivert()
	if err != nil {
		t.Fatal(err)
	}
	type need struct {
		progType ebpf.ProgramType
		helper   asm.BuiltinFunc
		mapType  ebpf.MapType
	}
	probed := map[need]bool{}
	for _, n := range kernelNeeds {
		probed[need{n.progType, n.helper, n.mapType}] = true
	}
	// Available to every program type that can use maps at all, and to every kernel that
	// has these program types.
	universal := map[asm.BuiltinFunc]bool{asm.FnMapLookupElem: true, asm.FnMapUpdateElem: true, asm.FnMapDeleteElem: true}
	for name, p := range spec.Programs {
		if !probed[need{progType: p.Type}] {
			t.Errorf("program %s: type %s is not probed", name, p.Type)
		}
		for _, ins := range p.Instructions {
			if !ins.IsBuiltinCall() {
				continue
			}
			fn := asm.BuiltinFunc(ins.Constant)
			if !universal[fn] && !probed[need{progType: p.Type, helper: fn}] {
				t.Errorf("program %s (%s) calls %s, which is not probed for that type", name, p.Type, fn)
			}
		}
	}
	basic := map[ebpf.MapType]bool{ebpf.Array: true, ebpf.Hash: true}
	for name, m := range spec.Maps {
		if !basic[m.Type] && !probed[need{mapType: m.Type}] {
			t.Errorf("map %s: type %s is not probed", name, m.Type)
		}
	}
}

// This kernel has everything; the bpffs check mounts a test bpffs when the pin root is not
// one, and leaves nothing mounted.
func TestProbe(t *testing.T) {
	testutil.RequirePrivileged(t)
	dir := t.TempDir()
	if err := Probe(Options{BPFFS: dir}); err != nil {
		t.Fatalf("Probe on this kernel: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(os.TempDir(), "divert-bpffs-probe-*")); len(left) > 0 {
		t.Errorf("probe left %v behind", left)
	}
}

// Probe failures wrap ebpf.ErrNotSupported whatever the cause, in one line.
func TestNotSupported(t *testing.T) {
	for _, err := range []error{ebpf.ErrNotSupported, os.ErrPermission, errors.New("strange\nfailure")} {
		got := notSupported("program type SkLookup", err)
		if !errors.Is(got, ebpf.ErrNotSupported) {
			t.Errorf("%v: does not wrap ErrNotSupported: %v", err, got)
		}
		if msg := got.Error(); msg == "" || strings.Contains(msg, "\n") {
			t.Errorf("%v: want one line, got %q", err, msg)
		}
	}
}
