package loader

import (
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// SetTestHookBeforeCommit lets tests fail an attach at its last step.
func SetTestHookBeforeCommit(fn func() error) { testHookBeforeCommit = fn }

// SetBuildTag makes the process load and attach the node's programs under tag, as another
// build would (its own programs, the node's maps); "" goes back to this build's.
func SetBuildTag(tag string) { testBuildTag = tag }

// NodeProgramIDs are the program IDs of the node's programs of the current build tag, by
// name (sk_lookup's is the build's template).
func NodeProgramIDs(opts Options) (map[string]uint32, error) {
	unlock, err := lockState(opts)
	if err != nil {
		return nil, err
	}
	defer unlock()
	n, err := loadNode(opts)
	if err != nil {
		return nil, err
	}
	defer n.Close()
	ids := map[string]uint32{}
	for name, p := range n.progs {
		info, err := p.Info()
		if err != nil {
			return nil, err
		}
		id, _ := info.ID()
		ids[name] = uint32(id)
	}
	return ids, nil
}

// AttachPerPodLayout attaches pod as divert did before the node's programs (main before
// issue 24, whose object is testdata/perpod/divert_bpfel.o): the pod's own copy of every
// program and map, loaded for it, pinned in its directory, armed. It stands for a pod an
// earlier version attached, which this build must keep working.
func AttachPerPodLayout(pod Pod, cfg *policy.Config, opts Options) error {
	unlock, err := lockState(opts)
	if err != nil {
		return err
	}
	defer unlock()
	addrs, err := LocalAddrs(pod.NetNS)
	if err != nil {
		return err
	}
	spec, err := ebpf.LoadCollectionSpec("testdata/perpod/divert_bpfel.o")
	if err != nil {
		return err
	}
	var copts ebpf.CollectionOptions
	copts.Programs.KernelTypes = kernelTypes()
	coll, err := ebpf.NewCollectionWithOptions(spec, copts)
	if err != nil {
		return err
	}
	defer coll.Close()
	m := &maps.Maps{}
	for _, f := range mapFields(m) {
		if slices.Contains(perPodLayoutMaps, f.name) {
			*f.ptr = coll.Maps[f.name]
		}
	}
	if err := maps.Apply(m, cfg, addrs); err != nil {
		return err
	}
	if err := disarm(m); err != nil {
		return err
	}
	if _, err := adoptListeners(pod, cfg.InboundCapturePort, m.InboundListeners, 0); err != nil {
		return err
	}
	dir := PinDir(opts, pod.ID)
	if err := mkdirPrivate(dir); err != nil {
		return err
	}
	if err := pinMaps(m, dir); err != nil {
		return err
	}
	for _, p := range programs {
		l, err := p.attachTo(pod, coll.Programs[p.name])
		if err != nil {
			return err
		}
		err = l.Pin(filepath.Join(dir, p.pin))
		l.Close()
		if err != nil {
			return err
		}
	}
	return arm(m, cfg)
}

// MakeNodeMaps pins the node's maps as a build whose MAX_SLOTS is slots would have made
// them (the first node layout's was 512), on a node that has none yet.
func MakeNodeMaps(opts Options, slots uint32) error {
	spec, err := divertSpec()
	if err != nil {
		return err
	}
	for name, ms := range spec.Maps {
		if strings.HasPrefix(name, "slot_") {
			ms.MaxEntries = slots
		}
	}
	spec.Maps["node_listeners"].MaxEntries = slots * listenerSlots
	if err := mkdirPrivate(nodeDir(opts)); err != nil {
		return err
	}
	n := &node{maps: map[string]*ebpf.Map{}}
	defer n.Close()
	return n.createMaps(spec, opts)
}

// DivertParses is how many times this process parsed divert.c's object (parsedSpec).
func DivertParses() int { return int(divertParses.Load()) }

// SkLookupUsedMaps lists the maps the two sk_lookup programs of sk_lookup's object use.
func SkLookupUsedMaps() ([]string, error) {
	spec, err := skLookupSpec()
	if err != nil {
		return nil, err
	}
	var used []string
	for _, name := range []string{skLookupFast, skLookupStatic} {
		for _, ins := range spec.Programs[name].Instructions {
			if ref := ins.Reference(); spec.Maps[ref] != nil && !slices.Contains(used, ref) {
				used = append(used, ref)
			}
		}
	}
	return used, nil
}

// NodeMaps are the maps the node holds for every pod, the trace maps among them.
func NodeMaps() []string {
	return append(nodeMapNames(), "trace_control_map", "trace_events", "trace_owner")
}

// NodeMapIDs are the IDs of the node's pinned maps (trace maps included), by name.
func NodeMapIDs(opts Options) (map[ebpf.MapID]string, error) {
	ids := map[ebpf.MapID]string{}
	for _, name := range NodeMaps() {
		path := filepath.Join(nodeMapsDir(opts), name)
		if nodeMaps[name] {
			path = filepath.Join(traceDir(opts), name)
		}
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			return nil, err
		}
		ids[mapID(m)] = name
		m.Close()
	}
	return ids, nil
}

// ForgetSlotSkLookup unpins the sk_lookup program this build loaded for slot, as if no pod
// had been in the slot yet.
func ForgetSlotSkLookup(opts Options, slot uint32) error {
	return os.Remove(filepath.Join(buildsDir(opts), buildTag(), slotSkLookupPin(slot)))
}

// SlotOf is the slot recorded for the attached pod id.
func SlotOf(opts Options, id string) (uint32, error) { return readSlot(PinDir(opts, id)) }
