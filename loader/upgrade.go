// Program upgrade: whether pinned maps fit this build's programs, and swapping the node's
// programs of this build in for a pod's running ones with link.Update.

package loader

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshdivert/divert/maps"
)

// checkPinnedMaps checks that pinned maps have the layout this build's programs expect,
// as loading the programs with them would.
func checkPinnedMaps(pinned *maps.Maps) error {
	spec, err := parsedSpec()
	if err != nil {
		return fmt.Errorf("load embedded BPF spec: %w", err)
	}
	forEachLoadMap(pinned, func(name string, m *ebpf.Map) {
		if ms := spec.Maps[name]; err == nil && ms != nil {
			if cerr := ms.Compatible(m); cerr != nil {
				err = fmt.Errorf("using replacement map %s: %w", name, cerr)
			}
		}
	})
	return err
}

// swapPrograms replaces the program behind each of a node-layout pod's links (existing
// and running: by program name) that opts keep and that is not this build's with the
// node's. The cgroup programs are the node's own; a pod's sk_lookup is this build's when
// its tag is that of the build's template (the slot is a constant in .rodata, which the
// tag leaves out), else one is loaded for the pod's slot. link.Update swaps atomically,
// so no connection escapes an upgrade, and the new cgroup programs use the same pod_slot
// map, so they read the pod's slot (TestPrototypeSlotSurvivesLinkUpdate).
func swapPrograms(existing map[string]link.Link, running map[string]ebpf.ProgramID, n *node, slot uint32, opts Options) error {
	for _, p := range programs {
		l, ok := existing[p.name]
		if !ok || !p.wanted(opts) {
			continue
		}
		want := n.progs[p.name]
		current, err := sameProgram(running[p.name], want, p.attach == ebpf.AttachSkLookup, n.maps["trace_events"])
		if err != nil {
			return fmt.Errorf("read %s program: %w", p.name, err)
		}
		if current {
			continue
		}
		if p.attach == ebpf.AttachSkLookup {
			prog, err := podSkLookup(n, slot)
			if err != nil {
				return err
			}
			defer prog.Close()
			want = prog
		}
		if err := l.Update(want); err != nil {
			return fmt.Errorf("replace %s program: %w", p.name, err)
		}
		step("swap " + p.name)
	}
	return nil
}

// sameProgram says whether the running program is want (byTag: has want's tag and
// therefore its code, and writes to the node's trace ring buffer, events).
func sameProgram(running ebpf.ProgramID, want *ebpf.Program, byTag bool, events *ebpf.Map) (bool, error) {
	info, err := want.Info()
	if err != nil {
		return false, err
	}
	if !byTag {
		id, _ := info.ID()
		return id == running, nil
	}
	prog, err := ebpf.NewProgramFromID(running)
	if err != nil {
		return false, err
	}
	defer prog.Close()
	rinfo, err := prog.Info()
	if err != nil {
		return false, err
	}
	ids, _ := rinfo.MapIDs()
	return rinfo.Tag == info.Tag && containsID(ids, mapID(events)), nil
}
