package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// ErrCgroupRoot is wrapped by Attach's error when asked to attach to the root of the cgroup
// v2 hierarchy: every process on the host would be captured.
var ErrCgroupRoot = errors.New("it is the root of the cgroup v2 hierarchy, which holds every process on the host")

// ErrCaptured is wrapped (as a *CapturedError) by Attach's error when divert's programs of
// another pod already run where this pod's would: on its cgroup, an ancestor or a
// descendant of it (the kernel runs both for the processes below, and the second pod's
// bookkeeping breaks the first's), or on its network namespace.
var ErrCaptured = errors.New("already captured by divert")

// CapturedError says which pod's programs are in the way, and where.
type CapturedError struct {
	// Holder is the id of the pod whose pins hold the programs; "" when no pod under this
	// bpffs does (pinned in another bpffs, or by another divert).
	Holder string
	// Relation is where they are relative to the pod's cgroup: "cgroup" (the cgroup
	// itself), "ancestor", "descendant", or "netns" (its network namespace).
	Relation string
	// Where is the cgroup directory or netns path they are attached to, when known.
	Where string
	// Program and ProgramID name one of them, as the kernel does.
	Program   string
	ProgramID ebpf.ProgramID
}

func (e *CapturedError) Error() string {
	who := "pod " + e.Holder
	if e.Holder == "" {
		who = fmt.Sprintf("a divert attachment pinned elsewhere (program %s, id %d)", e.Program, e.ProgramID)
	}
	where := e.Where
	switch {
	case e.Relation == "cgroup":
		where = "this cgroup"
	case e.Relation == "ancestor" && e.Where == "":
		where = "an ancestor of this cgroup"
	case e.Relation == "ancestor", e.Relation == "descendant":
		where = "its " + e.Relation + " " + e.Where
	case e.Relation == "netns":
		where = "its network namespace"
	}
	return fmt.Sprintf("%s already captures %s (one pod's divert programs per cgroup subtree and network namespace)", who, where)
}

func (e *CapturedError) Unwrap() error { return ErrCaptured }

// cgroupAttachTypes are the attach types of divert's cgroup programs.
var cgroupAttachTypes = func() []ebpf.AttachType {
	var out []ebpf.AttachType
	for _, p := range programs {
		if p.attach != ebpf.AttachSkLookup {
			out = append(out, p.attach)
		}
	}
	return out
}()

// isCgroupRoot reports whether dir is the root of its cgroup v2 hierarchy: the only cgroup
// without a cgroup.type file (the kernel leaves it off the root, Linux 4.14+). A cgroup
// namespace's root has one, and attaching there is judged like any other cgroup.
func isCgroupRoot(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "cgroup.type"))
	return errors.Is(err, os.ErrNotExist)
}

// checkOverlap refuses to attach pod where another pod's divert programs already run: the
// kernel's own lists (programs attached to the cgroup, effective from its ancestors, attached
// to each descendant, and sk_lookup on the netns) are the truth; the pins under opts' bpffs
// only name the holder. The pod's own links (a re-attach) are not in the way.
//
// Programs are the node's, shared by every pod (node.go), so a program id says nothing of
// whose attachment it is: the pod's own are told apart by count (its pinned links of that
// attach type on that cgroup or netns), the holder by its links' cgroup or netns.
func checkOverlap(pod Pod, opts Options) error {
	ours := pinnedTargets(PinDir(opts, pod.ID))
	check := func(target, relation string, flags uint32, types ...ebpf.AttachType) error {
		for _, at := range types {
			mine := 0
			if relation == "cgroup" || relation == "ancestor" || relation == "netns" {
				mine = ours[at] // the pod's own, on its cgroup (listed as effective too) or netns
			}
			id, name, err := findDivert(target, at, flags, mine)
			if err != nil {
				return err
			}
			if id != 0 {
				return captured(opts, pod, relation, target, at, id, name)
			}
		}
		return nil
	}
	if err := check(pod.Cgroup, "cgroup", 0, cgroupAttachTypes...); err != nil {
		return err
	}
	// The effective list holds the ancestors' programs too, also those above a cgroup
	// namespace or mount this process cannot name.
	if err := check(pod.Cgroup, "ancestor", unix.BPF_F_QUERY_EFFECTIVE, cgroupAttachTypes...); err != nil {
		return err
	}
	err := filepath.WalkDir(pod.Cgroup, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil // a container cgroup removed while walking
			}
			return err
		}
		if !d.IsDir() || p == pod.Cgroup {
			return nil
		}
		if err := check(p, "descendant", 0, cgroupAttachTypes...); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	return check(pod.NetNS, "netns", 0, ebpf.AttachSkLookup)
}

// findDivert returns one of divert's programs that the kernel lists for target (a cgroup
// directory or netns path) and attach type beyond the first mine of them (the pod's own),
// or id 0.
func findDivert(target string, attach ebpf.AttachType, flags uint32, mine int) (ebpf.ProgramID, string, error) {
	f, err := os.Open(target)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: attach, QueryFlags: flags})
	if err != nil {
		return 0, "", fmt.Errorf("query %s programs on %s: %w", attach, target, err)
	}
	var id ebpf.ProgramID
	var name string
	found := 0
	for _, p := range res.Programs {
		if n, ok := divertProgram(p.ID); ok {
			found++
			id, name = p.ID, n
		}
	}
	if found > mine {
		return id, name, nil
	}
	return 0, "", nil
}

// NetNSCaptured reports divert's eBPF capture of the network namespace at netnsPath: its
// sk_lookup program, and the pod under opts' bpffs that holds it (Holder "" if none does).
// It returns nil when there is none. A pod attached with NoInbound has no program on its
// netns and is not seen.
func NetNSCaptured(netnsPath string, opts Options) (*CapturedError, error) {
	id, name, err := findDivert(netnsPath, ebpf.AttachSkLookup, 0, 0)
	if err != nil || id == 0 {
		return nil, err
	}
	var ce *CapturedError
	errors.As(captured(opts, Pod{NetNS: netnsPath}, "netns", netnsPath, ebpf.AttachSkLookup, id, name), &ce)
	return ce, nil
}

// divertProgram reports whether the program with id is one of divert's, by the name the
// kernel keeps (the first 15 bytes of the C function's: "divert_getsocko").
func divertProgram(id ebpf.ProgramID) (string, bool) {
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return "", false // gone meanwhile
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		return "", false
	}
	return info.Name, strings.HasPrefix(info.Name, "divert_")
}

// pinnedTargets counts the links pinned in dir that are still attached, by attach type.
func pinnedTargets(dir string) map[ebpf.AttachType]int {
	n := map[ebpf.AttachType]int{}
	for _, p := range programs {
		l, err := link.LoadPinnedLink(filepath.Join(dir, p.pin), nil)
		if err != nil {
			continue
		}
		if info, err := l.Info(); err == nil && linkAttached(info) {
			n[p.attach]++
		}
		l.Close()
	}
	return n
}

// linkAttached says whether a link still has its cgroup or netns (the kernel detaches a
// link whose target went away).
func linkAttached(info *link.Info) bool {
	if cg := info.Cgroup(); cg != nil {
		return cg.CgroupId != 0
	}
	if ns := info.NetNs(); ns != nil {
		return ns.NetnsInode != 0
	}
	return false
}

// captured builds the error for a divert program found in the way, naming the pod whose
// pins hold a link of that attach type on the target (for an ancestor: on one of the
// pod's ancestors, and which) when this bpffs has them.
func captured(opts Options, pod Pod, relation, target string, at ebpf.AttachType, id ebpf.ProgramID, name string) error {
	e := &CapturedError{Relation: relation, Where: target, Program: name, ProgramID: id}
	if relation == "ancestor" {
		e.Where = ""
	}
	var st unix.Stat_t
	if unix.Stat(target, &st) != nil {
		return e
	}
	ids, _ := List(opts)
	for _, other := range ids {
		if other == pod.ID {
			continue
		}
		for _, p := range programs {
			if p.attach != at {
				continue
			}
			l, err := link.LoadPinnedLink(filepath.Join(PinDir(opts, other), p.pin), nil)
			if err != nil {
				continue
			}
			info, err := l.Info()
			l.Close()
			if err != nil {
				continue
			}
			switch {
			case info.NetNs() != nil:
				if uint64(info.NetNs().NetnsInode) != st.Ino {
					continue
				}
			case info.Cgroup() != nil && relation == "ancestor":
				if e.Where = ancestorByID(pod.Cgroup, info.Cgroup().CgroupId); e.Where == "" {
					continue
				}
			case info.Cgroup() != nil:
				if info.Cgroup().CgroupId != st.Ino {
					continue
				}
			default:
				continue
			}
			e.Holder = other
			return e
		}
	}
	return e
}

// ancestorByID finds the ancestor directory of dir whose cgroup id (inode) is id, or "".
func ancestorByID(dir string, id uint64) string {
	for d := filepath.Dir(dir); d != filepath.Dir(d); d = filepath.Dir(d) {
		var st unix.Stat_t
		if unix.Stat(d, &st) != nil {
			return ""
		}
		if st.Ino == id {
			return d
		}
	}
	return ""
}
