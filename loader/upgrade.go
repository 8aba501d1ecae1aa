// Program upgrade: whether the programs running for a pod are this build's (the kernel's
// program tags) on the pod's own pinned maps, and whether pinned maps fit this build's
// programs; loading this build's programs for an update when they are not, and swapping
// them in with link.Update.

package loader

import (
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshdivert/divert/maps"
)

// loadedTags holds the kernel's tags of the programs this process loaded, by program name:
// the tags of this build's programs on this kernel. The kernel computes a tag from the
// instructions with map references blanked, so it is the same for every pod.
var loadedTags struct {
	sync.Mutex
	byName map[string]string
}

// rememberTags records the tags of freshly loaded programs, for programsCurrent, once:
// every load of this build on this kernel gets the same ones.
func rememberTags(o *objects) {
	loadedTags.Lock()
	known := loadedTags.byName != nil
	loadedTags.Unlock()
	if known {
		return
	}
	tags := make(map[string]string, len(programs))
	for _, p := range programs {
		info, err := o.program(p.name).Info()
		if err != nil {
			return // then updates keep loading the programs, as if nothing were known
		}
		tags[p.name] = info.Tag
	}
	loadedTags.Lock()
	loadedTags.byName = tags
	loadedTags.Unlock()
}

// programsCurrent reports whether every program opts want runs already, as this build's
// code on the pod's own pinned maps (and the node's, trace.go): the tag of its instructions is the one this process
// got loading them, and every map it uses is one of the pinned ones. Then swapping in a
// fresh copy would change nothing but program ids. Anything unknown answers false (load
// and swap, as always), so the first update in a process loads the programs.
func programsCurrent(running map[string]ebpf.ProgramID, pinned *maps.Maps, opts Options) bool {
	loadedTags.Lock()
	tags := loadedTags.byName
	loadedTags.Unlock()
	if tags == nil {
		return false
	}
	mapIDs := map[ebpf.MapID]bool{}
	ok := true
	forEachLoadMap(pinned, func(_ string, m *ebpf.Map) {
		info, err := m.Info()
		if err != nil {
			ok = false
			return
		}
		id, has := info.ID()
		ok = ok && has
		mapIDs[id] = true
	})
	if !ok {
		return false
	}
	for _, p := range programs {
		if !p.wanted(opts) {
			continue
		}
		id, attached := running[p.name]
		if !attached {
			return false // to be attached: that needs the program
		}
		prog, err := ebpf.NewProgramFromID(id)
		if err != nil {
			return false
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil || tags[p.name] == "" || info.Tag != tags[p.name] {
			return false
		}
		used, has := info.MapIDs()
		if !has {
			return false
		}
		for _, id := range used {
			if !mapIDs[id] {
				return false
			}
		}
	}
	return true
}

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

// loadForUpdate loads this build's programs for a pod being updated, onto its pinned maps,
// only when something needs them: one to attach, or a running one (running: by name) that
// is not this build's. A re-attach with the programs in place, the node agent's refresh of
// every pod when it starts, rewrites the maps only: then it reports current and loads
// nothing. An error means the pins do not fit this build.
func loadForUpdate(objs *objects, running map[string]ebpf.ProgramID, pinned *maps.Maps, opts Options) (current bool, err error) {
	if err := checkPinnedMaps(pinned); err != nil {
		return false, err
	}
	if programsCurrent(running, pinned, opts) {
		return true, nil
	}
	return false, loadObjects(objs, pinned)
}

// swapPrograms replaces the program behind each of the pod's links (existing: by program
// name) that opts keep with objs' own. link.Update swaps atomically, so no connection
// escapes an upgrade.
func swapPrograms(existing map[string]link.Link, objs *objects, opts Options) error {
	for _, p := range programs {
		if l, ok := existing[p.name]; ok && p.wanted(opts) {
			if err := l.Update(objs.program(p.name)); err != nil {
				return fmt.Errorf("replace %s program: %w", p.name, err)
			}
			step("swap " + p.name)
		}
	}
	return nil
}
