package cgroups

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Finder locates the pod cgroup of the calling process on this machine.
type Finder struct {
	// Root, if set, is where the host's cgroup v2 hierarchy is mounted (--cgroup-root), for
	// containers whose /sys/fs/cgroup is their own view. A directory with the cgroup2 mount
	// below it (a hybrid host's /sys/fs/cgroup, holding it as "unified") works too: see
	// MountAt. Empty: every cgroup2 mount in Mountinfo is tried.
	Root string
	// ProcCgroup is read for this process's cgroups; /proc/self/cgroup if empty.
	ProcCgroup string
	// Mountinfo is read for the cgroup2 mounts; /proc/self/mountinfo if empty.
	Mountinfo string
}

// IsCgroup2Dir reports whether dir is a directory on a cgroup v2 file system.
func IsCgroup2Dir(dir string) bool {
	if on, err := OnCgroup2(dir); err != nil || !on {
		return false
	}
	fi, err := os.Stat(dir)
	return err == nil && fi.IsDir()
}

// OnCgroup2 reports whether p is on a cgroup v2 file system; the error is statfs(2)'s.
func OnCgroup2(p string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return false, err
	}
	return st.Type == unix.CGROUP2_SUPER_MAGIC, nil
}

// ErrNoCgroup2 is wrapped by MountAt's and RootMount's errors when no cgroup2 file system is
// mounted at or below the root they were given; ErrV1Only is wrapped as well when cgroup v1
// hierarchies are (a host without cgroup v2, a cause for iptables rather than a mistake).
var (
	ErrNoCgroup2 = errors.New("no cgroup2 file system is mounted at or below it")
	ErrV1Only    = errors.New("cgroup v1 hierarchies only: the host has no cgroup v2")
)

// MountAt finds the cgroup2 mount that root, a --cgroup-root value (absolute, free of
// symlinks), stands for among mounts (mountinfo, in order): a cgroup2 mount at root itself (a
// cgroup v2 host's /sys/fs/cgroup, mounted as a hostPath volume), else the one closest below
// root (a hybrid host's /sys/fs/cgroup is a tmpfs holding the v1 hierarchies and the cgroup2
// one, as "unified" on systemd hosts; whatever its name, mountinfo says which it is). A later
// mount at the same point hides an earlier one. The mount's Root is mountinfo's, or "/" where
// mountinfo can only say that it lies outside this process's cgroup namespace (a hostPath
// mount of the host's tree seen from a container's namespace): root is taken to be the top of
// the host's hierarchy then.
func MountAt(root string, mounts []Mount) (Mount, error) {
	root = path.Clean(root)
	last := map[string]Mount{}
	var order []string
	for _, m := range mounts {
		p := path.Clean(m.Point)
		if _, seen := last[p]; !seen {
			order = append(order, p)
		}
		last[p] = m
	}
	at := func(m Mount, p string) Mount {
		r := m.Root
		if r == "" || r == "/.." || strings.HasPrefix(r, "/../") {
			r = "/"
		}
		return Mount{Root: r, Point: p, FSType: m.FSType}
	}
	if m, ok := last[root]; ok && m.FSType == "cgroup2" {
		return at(m, root), nil
	}
	var below []string
	v1 := false
	for _, p := range order {
		if root != "/" && !strings.HasPrefix(p, root+"/") || p == root {
			continue
		}
		switch last[p].FSType {
		case "cgroup2":
			below = append(below, p)
		case "cgroup":
			v1 = true
		}
	}
	depth := func(p string) int { return strings.Count(p, "/") }
	slices.SortStableFunc(below, func(a, b string) int { return depth(a) - depth(b) })
	switch {
	case len(below) > 1 && depth(below[0]) == depth(below[1]):
		return Mount{}, fmt.Errorf("it has several cgroup2 mounts below it (%s, %s): pass the one that shows the host's hierarchy", below[0], below[1])
	case len(below) > 0:
		return at(last[below[0]], below[0]), nil
	}
	for p := path.Dir(root); last[root] == (Mount{}); p = path.Dir(p) {
		if m, ok := last[p]; ok {
			if m.FSType == "cgroup2" {
				return Mount{}, fmt.Errorf("it is a directory inside the cgroup2 mount %s, not a mount: pass %s", p, p)
			}
			break
		}
		if p == "/" {
			break
		}
	}
	if v1 {
		return Mount{}, fmt.Errorf("%w (%w)", ErrNoCgroup2, ErrV1Only)
	}
	return Mount{}, ErrNoCgroup2
}

// RootMount turns a --cgroup-root value into the cgroup2 mount it stands for (MountAt), read
// from mountinfo (/proc/self/mountinfo if empty). root must exist; symlinks in it are
// resolved, as mountinfo names mounts by their real paths.
func RootMount(root, mountinfo string) (Mount, error) {
	if mountinfo == "" {
		mountinfo = "/proc/self/mountinfo"
	}
	info, err := os.ReadFile(mountinfo)
	if err != nil {
		return Mount{}, err
	}
	all, err := ParseMountinfo(string(info))
	if err != nil {
		return Mount{}, err
	}
	return rootMount(root, all)
}

func rootMount(root string, all []Mount) (Mount, error) {
	abs, err := filepath.Abs(root)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return Mount{}, err
	}
	return MountAt(abs, all)
}

// Find locates the pod's cgroup. See Locate for the rules; in addition, a process inside
// a cgroup namespace (whose /proc/self/cgroup says "0::/") is found by the inode of its
// own cgroup in the host's hierarchy, which must then be mounted somewhere (Root).
func (f Finder) Find() (Found, error) {
	procPath, infoPath := f.ProcCgroup, f.Mountinfo
	if procPath == "" {
		procPath = "/proc/self/cgroup"
	}
	if infoPath == "" {
		infoPath = "/proc/self/mountinfo"
	}
	proc, err := os.ReadFile(procPath)
	if err != nil {
		return Found{}, err
	}
	info, err := os.ReadFile(infoPath)
	if err != nil {
		return Found{}, err
	}
	all, err := ParseMountinfo(string(info))
	if err != nil {
		return Found{}, err
	}
	mounts := Cgroup2Mounts(all)
	if f.Root != "" {
		m, err := rootMount(f.Root, all)
		if err != nil {
			return Found{}, fmt.Errorf("invalid --cgroup-root %q: %w", f.Root, err)
		}
		mounts = []Mount{m}
	}
	found, err := Locate(string(proc), mounts, IsCgroup2Dir)
	if err == nil && found.Driver != Parent {
		return found, nil
	}
	// In a cgroup namespace the paths above are relative to a root this process cannot
	// name; its own cgroup's inode (the cgroup id) is the same in every view, though.
	pc, perr := ParseProcCgroup(string(proc))
	if perr != nil || pc.V2 != "/" {
		return found, err
	}
	if ns, nsErr := findByInode(pc.V2, Cgroup2Mounts(all), append(mounts, Cgroup2Mounts(all)...)); nsErr == nil {
		return ns, nil
	}
	return found, err
}

// findByInode finds this process's cgroup (own, relative to its cgroup namespace) by inode:
// through a mount of the namespace's root in views, then by walking every mount in search.
func findByInode(own string, views, search []Mount) (Found, error) {
	var ino uint64
	for _, m := range views {
		if m.Root != "/" {
			continue // not the namespace's root (or outside the namespace)
		}
		var st unix.Stat_t
		if err := unix.Stat(path.Join(m.Point, own), &st); err == nil {
			ino = st.Ino
			break
		}
	}
	if ino == 0 {
		return Found{}, ErrNotFound
	}
	for _, m := range search {
		dir, err := walkForInode(m.Point, ino, 16)
		if err != nil || dir == m.Point {
			continue // not in this mount, or this mount is the namespace's own view
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(dir, m.Point), "/")
		if pp, ok := ParsePath(rel); ok {
			return Found{Pod: path.Join(m.Point, pp.Path), Own: dir, UID: pp.UID, Driver: pp.Driver}, nil
		}
	}
	return Found{}, ErrNotFound
}

var errFound = errors.New("found")

// FindByID returns the cgroup directory under root (a cgroup2 mount) whose cgroup id is id:
// on cgroup2 a cgroup's id is its directory's inode.
func FindByID(root string, id uint64) (string, error) { return walkForInode(root, id, 16) }

// walkForInode returns the directory under root whose inode is ino, at most depth levels
// down. Cgroup trees are small (thousands of directories on a busy node).
func walkForInode(root string, ino uint64, depth int) (string, error) {
	var hit string
	root = path.Clean(root)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // a cgroup removed while walking, or a control file
		}
		if strings.Count(strings.TrimPrefix(p, root), "/") > depth {
			return fs.SkipDir
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) == nil && st.Ino == ino {
			hit = p
			return errFound
		}
		return nil
	})
	if hit != "" {
		return hit, nil
	}
	if err == nil {
		err = ErrNotFound
	}
	return "", err
}
