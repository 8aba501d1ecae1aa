package initmode

import (
	"errors"
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/internal/image"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
)

// On a node where this build's programs are pinned, an init container loads only what is
// its pod's own, the sk_lookup program: no feature probes (the sk_storage one waits out an
// RCU grace period), no second load of the node's programs (issue 24).
func TestWarmNodeLoadsOnlyThePodsProgram(t *testing.T) {
	divert := image.Divert(t)
	opts := divertest.BPFFS(t)
	args := append([]string{"istio-iptables"}, injectorArgs...)
	args = append(args, "--bpffs", opts.BPFFS, "--mode", "ebpf")
	for i := range 2 {
		k := newK8sPod(t, cgroupfsLayout)
		before := lastProgramID(t)
		initContainer(t, k, nil, divert, args...).mustSucceed(t, "istio-iptables")
		t.Cleanup(func() { loader.Detach(k.UID, opts) })
		loaded := countProgramsAfter(t, before)
		if i == 0 {
			continue // the first pod on the node loads the node's programs
		}
		// Its sk_lookup, and cilium/ebpf's own feature test at its first load (a two-
		// instruction socket filter); the feature probes it no longer runs were eight more.
		if loaded > 2 {
			t.Errorf("the second pod's init container loaded %d programs, want 2 (its sk_lookup and the library's feature test)", loaded)
		}
		checkCapture(t, k, divertest.Config(t, injectorArgs...))
	}
}

func lastProgramID(t *testing.T) ebpf.ProgramID {
	t.Helper()
	var id ebpf.ProgramID
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			return id
		}
		if err != nil {
			t.Fatal(err)
		}
		id = next
	}
}

// countProgramsAfter counts the programs loaded since the one with ID after, freed ones
// too: IDs only grow, and the run's last load (the pod's sk_lookup) stays loaded. Anything
// else loading programs meanwhile would count too; CI runs one test package at a time.
func countProgramsAfter(t *testing.T, after ebpf.ProgramID) int {
	t.Helper()
	return int(lastProgramID(t) - after)
}
