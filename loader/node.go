// The node's programs (issue 24): the cgroup programs are loaded and verified once per node
// and build, pinned under <bpffs>/divert_node/programs/<build>/, and attached to every pod;
// each pod's own maps are reached through the node's outer maps at the pod's slot, which
// the cgroup programs read from pod_slot, cgroup storage of their attachment
// (bpf/divert.c). The node's maps (pod_slot, the outer maps, the listeners, the socket
// storage) are pinned once under <bpffs>/divert_node/maps/ and outlive builds: an upgrade's
// programs use the same pod_slot, so link.Update keeps every pod's slot
// (TestPrototypeSlotSurvivesLinkUpdate). sk_lookup has no cgroup: it is loaded per pod
// slot, with its slot as a constant, from an object of its own (sklookup.go).

package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/maps"
)

const (
	maxSlots      = 1024 // MAX_SLOTS in bpf/types.h: a node made by this build holds maxSlots-1 pods
	listenerSlots = 64   // LISTENER_SLOTS: a pod's range of node_listeners
	slotPin       = "slot"
)

// nodeDir holds the node's maps and each build's programs.
func nodeDir(opts Options) string { return filepath.Join(opts.root(), "divert_node") }

func nodeMapsDir(opts Options) string { return filepath.Join(nodeDir(opts), "maps") }

func buildsDir(opts Options) string { return filepath.Join(nodeDir(opts), "programs") }

// buildTag names this build's programs (bpf.ObjectID: a hash of the embedded object).
func buildTag() string {
	if testBuildTag != "" {
		return testBuildTag
	}
	return objectID()
}

// objectID is bpf.ObjectID, hashed once per process.
var objectID = sync.OnceValue(bpf.ObjectID)

// testBuildTag, set by a test, stands for another build's tag: its programs are loaded and
// pinned apart, as an upgrade's would be.
var testBuildTag string

// podMapNames are a pod's own maps in the node layout: pinned in its directory and reached
// by the programs through slot_<name>.
var podMapNames = []string{
	"config_map", "counters", "dns_servers", "drops", "local_addrs",
	"outbound_exclude_cidrs", "outbound_exclude_cidrs6", "outbound_include_cidrs",
	"outbound_include_cidrs6", "owner_gids", "port_sets_map",
}

// nodeMapNames are the maps the node's programs share.
func nodeMapNames() []string {
	names := []string{"pod_slot", "node_listeners", "orig_dst_storage", "transparent_syns"}
	for _, n := range podMapNames {
		names = append(names, "slot_"+n)
	}
	return names
}

// node is the node's maps and one build's programs, open.
type node struct {
	maps  map[string]*ebpf.Map
	progs map[string]*ebpf.Program
	tag   string
	dir   string // the build's directory, once its programs are pinned there
	// skLookup is the sk_lookup program this kernel takes (see try_listener in
	// bpf/divert.c), recorded in the build's directory (skLookupPin).
	skLookup string
}

const (
	skLookupFast   = "divert_sk_lookup"
	skLookupStatic = "divert_sk_lookup_static"
	skLookupPin    = "sk_lookup" // a symlink to the program name, beside the build's programs
)

func (n *node) Close() {
	for _, m := range n.maps {
		m.Close()
	}
	for _, p := range n.progs {
		p.Close()
	}
}

// loadNode opens the node's maps and this build's programs, creating and pinning what is
// not there yet, for a caller that holds the state lock. Each is staged beside its place and
// renamed into it, so a killed loader leaves either nothing or all of it. (No crashpoints
// here: only the first attach on a node takes these steps, and the crash tests count the
// steps of an attach once and kill by number.)
func loadNode(opts Options) (*node, error) {
	if err := raiseMemlock(); err != nil {
		return nil, err
	}
	for _, d := range []string{nodeDir(opts), buildsDir(opts)} {
		if err := mkdirPrivate(d); err != nil {
			return nil, err
		}
	}
	if err := cleanNodeStaging(opts); err != nil {
		return nil, err
	}
	nd := &node{maps: map[string]*ebpf.Map{}, progs: map[string]*ebpf.Program{}, tag: buildTag()}
	if err := nd.openMaps(opts); err != nil {
		nd.Close()
		return nil, err
	}
	// divert trace's maps (trace.go), pinned apart: the programs write to them too.
	var trace maps.Maps
	if err := openNodeMaps(&trace, opts, false); err != nil {
		trace.Close()
		nd.Close()
		return nil, err
	}
	nd.maps["trace_control_map"], nd.maps["trace_events"], nd.maps["trace_owner"] = trace.TraceControlMap, trace.TraceEvents, trace.TraceOwner
	if err := nd.openPrograms(opts); err != nil {
		nd.Close()
		return nil, err
	}
	return nd, nil
}

// openMaps opens the node's pinned maps, or creates and pins them. Pinned ones are checked
// against this build's definitions only where its programs are loaded onto them
// (openPrograms): this build's pinned programs were, so on a warm node the embedded object
// is not parsed at all.
func (n *node) openMaps(opts Options) error {
	dir := nodeMapsDir(opts)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		spec, err := parsedSpec()
		if err != nil {
			return fmt.Errorf("load embedded BPF spec: %w", err)
		}
		return n.createMaps(spec, opts)
	}
	for _, name := range nodeMapNames() {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			return fmt.Errorf("open node map %s: %w", name, err)
		}
		n.maps[name] = m
	}
	return nil
}

// createMaps creates the node's maps as spec defines them and pins them, all at once.
func (n *node) createMaps(spec *ebpf.CollectionSpec, opts Options) error {
	dir := nodeMapsDir(opts)
	tmp, err := os.MkdirTemp(nodeDir(opts), "maps-")
	if err != nil {
		return err
	}
	for _, name := range nodeMapNames() {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			os.RemoveAll(tmp)
			return fmt.Errorf("create node map %s: %w", name, err)
		}
		n.maps[name] = m
		if err := m.Pin(filepath.Join(tmp, name)); err != nil {
			os.RemoveAll(tmp)
			return fmt.Errorf("pin node map %s: %w", name, err)
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("move node maps into %s: %w", dir, err)
	}
	return nil
}

// checkMaps says whether the node's maps (the trace maps among them) are what spec's
// programs expect, once fitted to the node's slot count.
func (n *node) checkMaps(spec *ebpf.CollectionSpec) error {
	fitToNodeMaps(spec, n.maps)
	for name, m := range n.maps {
		if err := spec.Maps[name].Compatible(m); err != nil {
			return fmt.Errorf("node map %s: %w (%w)", name, ErrIncompatible, err)
		}
	}
	return nil
}

// fitToNodeMaps sizes spec's slot-sized maps (the outer maps, node_listeners) as the node's
// are: a node keeps the slots its maps were made with (an earlier build made 512), and this
// build's programs load onto them as they are. The programs bound nothing by MAX_SLOTS: a
// slot past the end finds no inner map and no listener entry.
func fitToNodeMaps(spec *ebpf.CollectionSpec, nodeMaps map[string]*ebpf.Map) {
	for name, m := range nodeMaps {
		if ms := spec.Maps[name]; ms != nil && (strings.HasPrefix(name, "slot_") || name == "node_listeners") {
			ms.MaxEntries = m.MaxEntries()
		}
	}
}

// slotCount is how many slots the node's maps hold (slot 0 is "not armed").
func (n *node) slotCount() uint32 { return n.maps["slot_config_map"].MaxEntries() }

func (n *node) openPrograms(opts Options) error {
	dir := filepath.Join(buildsDir(opts), n.tag)
	if _, err := os.Stat(dir); err == nil {
		current, err := n.openBuild(dir)
		if err != nil || current {
			if current {
				n.dir = dir
			}
			return err
		}
		// Loaded with trace maps that are gone (divert_trace made anew): the build is
		// loaded again onto the node's, and pods get those programs at their next update
		// (swapPrograms); its old directory goes aside, to be removed (cleanNodeStaging)
		// while links keep the old programs alive.
		for name, p := range n.progs {
			p.Close()
			delete(n.progs, name)
		}
		aside, err := os.MkdirTemp(buildsDir(opts), "staging-stale-")
		if err != nil {
			return err
		}
		if err := os.Rename(dir, filepath.Join(aside, n.tag)); err != nil {
			return fmt.Errorf("move stale node programs aside: %w", err)
		}
	}
	spec, err := divertSpec()
	if err != nil {
		return fmt.Errorf("load embedded BPF spec: %w", err)
	}
	if err := n.checkMaps(spec); err != nil {
		return err
	}
	progs, err := loadNodePrograms(spec, n.maps)
	if err != nil {
		return err
	}
	n.progs = progs
	// sk_lookup's template, slot 0 (inert): each pod gets its own copy (loadSkLookup), and
	// this one's tag tells an update whether a pod's is this build's.
	if err := loadSkLookupTemplate(n); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(buildsDir(opts), "staging-")
	if err != nil {
		return err
	}
	if err := os.Symlink(n.skLookup, filepath.Join(tmp, skLookupPin)); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("record which sk_lookup: %w", err)
	}
	for name, prog := range progs {
		if err := prog.Pin(filepath.Join(tmp, name)); err != nil {
			os.RemoveAll(tmp)
			return fmt.Errorf("pin node program %s: %w", name, err)
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("move node programs into %s: %w", dir, err)
	}
	n.dir = dir
	return nil
}

func mapID(m *ebpf.Map) ebpf.MapID {
	info, err := m.Info()
	if err != nil {
		return 0
	}
	id, _ := info.ID()
	return id
}

// openBuild opens the build's pinned programs in dir, and says whether they are current:
// loaded onto the node's maps as they are now. Programs with another pod_slot are an
// error (they must never replace a pod's); with another trace ring buffer, stale.
func (n *node) openBuild(dir string) (current bool, err error) {
	if n.skLookup, err = os.Readlink(filepath.Join(dir, skLookupPin)); err != nil {
		return false, fmt.Errorf("node programs in %s: which sk_lookup: %w", dir, err)
	}
	slotID, cfgID, traceID := mapID(n.maps["pod_slot"]), mapID(n.maps["slot_config_map"]), mapID(n.maps["trace_events"])
	current = true
	for _, p := range programs {
		prog, err := ebpf.LoadPinnedProgram(filepath.Join(dir, p.name), nil)
		if err != nil {
			return false, fmt.Errorf("open node program %s: %w", p.name, err)
		}
		n.progs[p.name] = prog
		// They were loaded together: one of each kind tells (Info is not cheap).
		if p.name != "divert_connect4" && p.attach != ebpf.AttachSkLookup {
			continue
		}
		info, err := prog.Info()
		if err != nil {
			return false, err
		}
		want := slotID
		if p.attach == ebpf.AttachSkLookup {
			want = cfgID
		}
		ids, _ := info.MapIDs()
		if !containsID(ids, want) {
			return false, fmt.Errorf("node program %s in %s does not use the node's maps (%w)", p.name, dir, ErrIncompatible)
		}
		current = current && containsID(ids, traceID)
	}
	return current, nil
}

func containsID(ids []ebpf.MapID, id ebpf.MapID) bool {
	for _, i := range ids {
		if i == id {
			return true
		}
	}
	return false
}

// loadNodePrograms loads the cgroup programs onto the node's maps: the verifier's work,
// once per node and build.
func loadNodePrograms(spec *ebpf.CollectionSpec, nodeMaps map[string]*ebpf.Map) (map[string]*ebpf.Program, error) {
	s := spec.Copy()
	fitToNodeMaps(s, nodeMaps)
	var opts ebpf.CollectionOptions
	opts.Cache, opts.Programs.KernelTypes = btfCache, kernelTypes()
	opts.MapReplacements = nodeMaps
	// LoadAndAssign loads only what is asked for and what it uses: no pod's maps, no
	// .rodata (sk_lookup's slot), no .bss.
	type want struct {
		Getsockopt   *ebpf.Program `ebpf:"divert_getsockopt"`
		Sockops      *ebpf.Program `ebpf:"divert_sockops"`
		Recvmsg4     *ebpf.Program `ebpf:"divert_recvmsg4"`
		Recvmsg6     *ebpf.Program `ebpf:"divert_recvmsg6"`
		Getpeername4 *ebpf.Program `ebpf:"divert_getpeername4"`
		Getpeername6 *ebpf.Program `ebpf:"divert_getpeername6"`
		Connect4     *ebpf.Program `ebpf:"divert_connect4"`
		Connect6     *ebpf.Program `ebpf:"divert_connect6"`
		Sendmsg4     *ebpf.Program `ebpf:"divert_sendmsg4"`
		Sendmsg6     *ebpf.Program `ebpf:"divert_sendmsg6"`
	}
	var w want
	if err := s.LoadAndAssign(&w, &opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("kernel rejected divert's programs: %v", verr)
		}
		return nil, fmt.Errorf("load BPF programs: %w", err)
	}
	return map[string]*ebpf.Program{
		"divert_getsockopt": w.Getsockopt, "divert_sockops": w.Sockops,
		"divert_recvmsg4": w.Recvmsg4, "divert_recvmsg6": w.Recvmsg6,
		"divert_getpeername4": w.Getpeername4, "divert_getpeername6": w.Getpeername6,
		"divert_connect4": w.Connect4, "divert_connect6": w.Connect6,
		"divert_sendmsg4": w.Sendmsg4, "divert_sendmsg6": w.Sendmsg6,
	}, nil
}

// cleanNodeStaging removes what a killed loadNode left: unpinning a map or program nothing
// else holds frees it.
func cleanNodeStaging(opts Options) error {
	var errs []error
	for _, d := range []struct{ dir, prefix string }{{nodeDir(opts), "maps-"}, {buildsDir(opts), "staging-"}} {
		entries, err := os.ReadDir(d.dir)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), d.prefix) {
				errs = append(errs, os.RemoveAll(filepath.Join(d.dir, e.Name())))
			}
		}
	}
	return errors.Join(errs...)
}
