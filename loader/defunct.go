package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Defunct returns the programs of an attached pod whose links the kernel has detached
// because their target went away: the cgroup links when the pod's cgroup was removed, the
// sk_lookup link when its network namespace was destroyed. The pins (and with them the
// programs and maps) stay until someone removes them, which Detach and GC do. A link
// whose target is gone reports cgroup id 0 or netns inode 0; that is how it is told.
func Defunct(id string, opts Options) ([]string, error) {
	if !validID(id) {
		return nil, &InputError{Field: "pod-id", Value: id, Msg: badID}
	}
	dir := PinDir(opts, id)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	var gone []string
	for _, p := range programs {
		info, err := pinnedLinkInfo(dir, p)
		if err != nil {
			return nil, err
		}
		if info == nil {
			continue // that direction is turned off
		}
		cg, ns := info.Cgroup(), info.NetNs()
		if (cg != nil && cg.CgroupId == 0) || (ns != nil && ns.NetnsInode == 0) {
			gone = append(gone, p.name)
		}
	}
	return gone, nil
}

// GC removes the pins of every pod with a defunct link (see Defunct) and returns their
// ids. It is the node's clean-up for init-container mode, where no process stays around
// to detach when a pod goes away: the kernel detaches the programs with the pod's cgroup,
// but the pins keep the programs and maps in memory until removed.
func GC(opts Options) ([]string, error) {
	ids, err := List(opts)
	if err != nil {
		return nil, err
	}
	staged, _ := os.ReadDir(stagingDir(opts))
	builds, _ := os.ReadDir(buildsDir(opts))
	if len(ids) == 0 && len(staged) == 0 && len(builds) == 0 {
		return nil, nil // and no bpffs mounted just to find it empty
	}
	unlock, err := lockState(opts)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := cleanStaging(opts); err != nil {
		return nil, err
	}
	// Checking and removing under the state lock: an init container re-attaching the same
	// pod (its sandbox was recreated) must not lose its fresh attachment to a stale check.
	var removed []string
	var errs []error
	for _, id := range ids {
		gone, err := Defunct(id, opts)
		if errors.Is(err, ErrNotAttached) {
			continue // removed meanwhile
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(gone) == 0 {
			continue
		}
		if err := detachDir(PinDir(opts, id)); err != nil {
			errs = append(errs, fmt.Errorf("pod %s: %w", id, err))
			continue
		}
		removed = append(removed, id)
	}
	if err := gcBuilds(opts); err != nil {
		errs = append(errs, err)
	}
	if err := gcSlots(opts); err != nil {
		errs = append(errs, err)
	}
	return removed, errors.Join(errs...)
}

// gcBuilds removes the node's programs of every build but this one that no pod's link
// runs any more (an upgrade swapped them all, or their pods went), for a caller that holds
// the state lock.
func gcBuilds(opts Options) error {
	builds, err := os.ReadDir(buildsDir(opts))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	running := map[ebpf.ProgramID]bool{}
	ids, err := List(opts)
	if err != nil {
		return err
	}
	for _, id := range ids {
		for pid := range pinnedProgramIDs(PinDir(opts, id)) {
			running[pid] = true
		}
	}
	var errs []error
	for _, b := range builds {
		if b.Name() == buildTag() || !b.IsDir() {
			continue
		}
		dir := filepath.Join(buildsDir(opts), b.Name())
		if buildRuns(dir, running) {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove unused programs of build %s: %w", b.Name(), err))
		}
	}
	return errors.Join(errs...)
}

// buildRuns says whether a pod's link runs one of the programs pinned in a build's dir
// (sk_lookup's is the build's template, which no pod runs: each pod has its own copy).
func buildRuns(dir string, running map[ebpf.ProgramID]bool) bool {
	for _, p := range programs {
		prog, err := ebpf.LoadPinnedProgram(filepath.Join(dir, p.name), nil)
		if err != nil {
			continue
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil {
			return true // unknown: keep it
		}
		if id, _ := info.ID(); running[id] {
			return true
		}
	}
	return false
}

// pinnedProgramIDs returns the ids of the programs behind the links pinned in dir.
func pinnedProgramIDs(dir string) map[ebpf.ProgramID]bool {
	ids := map[ebpf.ProgramID]bool{}
	for _, p := range programs {
		l, err := link.LoadPinnedLink(filepath.Join(dir, p.pin), nil)
		if err != nil {
			continue
		}
		if info, err := l.Info(); err == nil {
			ids[info.Program] = true
		}
		l.Close()
	}
	return ids
}
