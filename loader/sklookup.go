// A pod's sk_lookup program in the node layout: sk_lookup has no cgroup, so each pod slot
// has its own copy (its slot a constant), loaded from sk_lookup's own small object
// (bpf/sk_lookup.c), not divert.c's: a pod taking a new slot on a warm node loads nothing
// else, and parsing divert.c's eleven programs and their BTF for it was a sixth of such an
// init run's CPU (issue 24).

package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/bpf"
)

// skLookupSpec is sk_lookup's object, parsed once per process, as parsedSpec is divert.c's.
var skLookupSpec = sync.OnceValues(bpf.LoadSkLookup)

// slotSkLookupPin names slot's sk_lookup program in the build's directory.
func slotSkLookupPin(slot uint32) string { return fmt.Sprintf("sk_lookup_slot_%d", slot) }

// podSkLookup is the sk_lookup program of the pod in slot: the one the slot's first pod
// loaded and pinned in the build's directory, else loaded and pinned now. A pod's copy
// differs from another's only by its slot, so the slot keeps it for the next pod, as it
// keeps its maps: on a warm node an attach then neither parses the object nor runs the
// verifier. An upgrade is a new build's directory; gc removes free slots' copies.
func podSkLookup(n *node, slot uint32) (*ebpf.Program, error) {
	if n.dir == "" {
		return loadSkLookup(n, slot)
	}
	pin := filepath.Join(n.dir, slotSkLookupPin(slot))
	if prog, err := ebpf.LoadPinnedProgram(pin, nil); err == nil {
		return prog, nil
	}
	prog, err := loadSkLookup(n, slot)
	if err != nil {
		return nil, err
	}
	os.Remove(pin) // one that could not be opened
	if err := prog.Pin(pin); err != nil {
		prog.Close()
		return nil, fmt.Errorf("pin slot %d's sk_lookup: %w", slot, err)
	}
	return prog, nil
}

// loadSkLookupTemplate loads the build's sk_lookup template (slot 0) as n.progs'
// divert_sk_lookup: the faster program where the kernel takes it, else the one for 5.10
// (try_listener in bpf/sk_lookup.h), and records which in n.skLookup.
func loadSkLookupTemplate(n *node) error {
	var errs []error
	for _, name := range []string{skLookupFast, skLookupStatic} {
		n.skLookup = name
		prog, err := loadSkLookup(n, 0)
		if err == nil {
			n.progs["divert_sk_lookup"] = prog
			return nil
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// loadSkLookup loads a pod's sk_lookup program (n.skLookup), its slot a constant, onto the
// node's maps: every map it uses is one (TestSkLookupUsesOnlyNodeMaps), so the load
// creates only its .rodata, which holds the slot. The template comes from here too, so a
// pod's program and the template have the same tag when they are the same build's.
func loadSkLookup(n *node, slot uint32) (*ebpf.Program, error) {
	parsed, err := skLookupSpec()
	if err != nil {
		return nil, fmt.Errorf("load embedded sk_lookup spec: %w", err)
	}
	spec := parsed.Copy() // loads may run concurrently (see divertSpec)
	if err := spec.Variables["lookup_slot"].Set(slot); err != nil {
		return nil, fmt.Errorf("set sk_lookup's slot: %w", err)
	}
	fitToNodeMaps(spec, n.maps)
	// No KernelTypes: sk_lookup reads no kernel structure (every CO-RE relocation is in
	// socket_owner, which only the cgroup programs call), and kernelTypes parses the
	// kernel's BTF, a fifth of an init container's CPU when the node's programs are pinned.
	var opts ebpf.CollectionOptions
	opts.Cache = btfCache
	opts.MapReplacements = n.maps
	var fast struct {
		SkLookup *ebpf.Program `ebpf:"divert_sk_lookup"`
	}
	var static struct {
		SkLookup *ebpf.Program `ebpf:"divert_sk_lookup_static"`
	}
	to, prog := any(&fast), &fast.SkLookup
	if n.skLookup == skLookupStatic {
		to, prog = &static, &static.SkLookup
	}
	if err := spec.LoadAndAssign(to, &opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("kernel rejected divert's sk_lookup program: %v", verr)
		}
		return nil, fmt.Errorf("load sk_lookup program: %w", err)
	}
	return *prog, nil
}
