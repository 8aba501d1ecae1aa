package cgroups

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Finder locates the pod cgroup of the calling process on this machine.
type Finder struct {
	// Root, if set, is where the host's cgroup v2 hierarchy is mounted (--cgroup-root), for
	// containers whose /sys/fs/cgroup is their own view. A directory that holds the
	// hierarchy as "unified" (a hybrid host's /sys/fs/cgroup) works too. Empty: every
	// cgroup2 mount in Mountinfo is tried.
	Root string
	// ProcCgroup is read for this process's cgroups; /proc/self/cgroup if empty.
	ProcCgroup string
	// Mountinfo is read for the cgroup2 mounts; /proc/self/mountinfo if empty.
	Mountinfo string
}

// IsCgroup2Dir reports whether dir is a directory on a cgroup v2 file system.
func IsCgroup2Dir(dir string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
		return false
	}
	fi, err := os.Stat(dir)
	return err == nil && fi.IsDir()
}

// RootMount turns a --cgroup-root value into the mount it stands for: the directory
// itself when it is a cgroup2 mount, else its "unified" subdirectory (hybrid layout).
func RootMount(root string) (Mount, error) {
	for _, dir := range []string{root, filepath.Join(root, "unified")} {
		if IsCgroup2Dir(dir) {
			return Mount{Root: "/", Point: path.Clean(dir), FSType: "cgroup2"}, nil
		}
	}
	return Mount{}, fmt.Errorf("invalid --cgroup-root %q: neither it nor %s is a cgroup v2 mount; pass where the host's cgroup2 hierarchy (or its /sys/fs/cgroup) is mounted", root, filepath.Join(root, "unified"))
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
		m, err := RootMount(f.Root)
		if err != nil {
			return Found{}, err
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
