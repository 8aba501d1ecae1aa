package main

import (
	"io/fs"
	"net/netip"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/meshdivert/divert/loader"
)

// tracePod is an attached pod as trace names it.
type tracePod struct {
	ID, Name string
	cgroupID uint64       // the cgroup its programs are attached to
	addrs    []netip.Addr // its own addresses: inbound decisions name the pod by them
	seen     bool         // its programs write to the node's ring buffer
}

func (p *tracePod) String() string {
	if p.Name != "" {
		return p.ID + " (" + p.Name + ")"
	}
	return p.ID
}

// podIndex tells which pod a decision is from: outbound ones by the connecting process's
// cgroup (the pod's, or a container's below it), inbound ones by their destination (the
// pod's own address). Pods come and go while trace runs: a decision it cannot place
// reads the pins (and the cgroup tree) again, at most once a second.
type podIndex struct {
	opts       loader.Options
	cgroupRoot string
	pods       []*tracePod
	byCgroup   map[uint64]*tracePod
	byAddr     map[netip.Addr]*tracePod
	parent     map[uint64]uint64 // cgroup id -> its parent's, from the cgroup tree
	last       time.Time
}

func newPodIndex(opts loader.Options, cgroupRoot string) *podIndex {
	return &podIndex{opts: opts, cgroupRoot: cgroupRoot}
}

// refresh reads the attached pods (and the cgroup tree) again, unless it did in the
// last second; force reads anyway.
func (x *podIndex) refresh(force bool) error {
	if !force && time.Since(x.last) < time.Second {
		return nil
	}
	x.last = time.Now()
	ids, err := loader.List(x.opts)
	if err != nil {
		return err
	}
	_, events, err := loader.TraceOn(x.opts)
	if err != nil {
		return err
	}
	x.pods, x.byCgroup, x.byAddr = nil, map[uint64]*tracePod{}, map[netip.Addr]*tracePod{}
	for _, id := range ids {
		st, err := loader.Status(id, x.opts)
		if err != nil {
			continue // detached meanwhile, or pins trace cannot read: not seen
		}
		p := &tracePod{ID: id, Name: st.Pod, seen: events != 0 && loader.Traced(st, events)}
		for _, prog := range st.Programs {
			if prog.CgroupID != 0 {
				p.cgroupID = prog.CgroupID
			}
		}
		for _, a := range st.Policy.LocalAddrs {
			if !a.IsLoopback() {
				p.addrs = append(p.addrs, a)
				x.byAddr[a] = p
			}
		}
		if p.cgroupID != 0 {
			x.byCgroup[p.cgroupID] = p
		}
		x.pods = append(x.pods, p)
	}
	x.parent = cgroupParents(x.cgroupRoot)
	return nil
}

// unseen lists the pods whose programs do not write to the node's ring buffer.
func (x *podIndex) unseen() []string {
	var out []string
	for _, p := range x.pods {
		if !p.seen {
			out = append(out, p.String())
		}
	}
	slices.Sort(out)
	return out
}

func (x *podIndex) byIDOrName(s string) *tracePod {
	for _, p := range x.pods {
		if p.ID == s || p.Name == s {
			return p
		}
	}
	return nil
}

func (x *podIndex) lookup(ev *traceEvent) *tracePod {
	if p := x.find(ev); p != nil {
		return p
	}
	if x.refresh(false) != nil {
		return nil
	}
	return x.find(ev)
}

func (x *podIndex) find(ev *traceEvent) *tracePod {
	if ev.ev.Inbound {
		return x.byAddr[ev.ev.Dst.Addr()]
	}
	// The pod's cgroup or the nearest of its ancestors that is one.
	for id, hops := ev.CgroupID, 0; id != 0 && hops < 64; id, hops = x.parent[id], hops+1 {
		if p := x.byCgroup[id]; p != nil {
			return p
		}
	}
	return nil
}

// cgroupParents maps each cgroup v2 directory's id (its inode number) to its parent's.
func cgroupParents(root string) map[uint64]uint64 {
	parents := map[uint64]uint64{}
	if root == "" {
		return parents
	}
	ino := func(path string) uint64 {
		var st syscall.Stat_t
		if syscall.Stat(path, &st) != nil {
			return 0
		}
		return st.Ino
	}
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() || path == root {
			return nil // a cgroup removed meanwhile: skip it
		}
		if id := ino(path); id != 0 {
			parents[id] = ino(filepath.Dir(path))
		}
		return nil
	})
	return parents
}
