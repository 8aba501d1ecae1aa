// Package cgroups finds a Kubernetes pod's cgroup v2 directory from inside one of its
// containers, as divert's init-container mode needs: the init container's own cgroup (read
// from /proc/self/cgroup) sits below the pod's, and programs attached to the pod's cgroup
// apply to every container of the pod, the ones that start later included.
//
// Kubelet names pod cgroups in one of two ways, and runtimes put each container below:
//
//	cgroupfs driver: <root>/kubepods[/besteffort|/burstable]/pod<uid>/<container id>
//	systemd driver:  <root>/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _>.slice/cri-containerd-<id>.scope
//
// On hybrid hosts, where kubelet and runc run in cgroup v1 mode, runc mirrors the v1 path
// into the v2 hierarchy, so the same path is found under the cgroup2 mount. In a container
// the host's cgroup2 mount is usually reachable only through a hostPath volume; mounts are
// read from /proc/self/mountinfo, so such a mount is found wherever it is.
//
// The parsing functions are pure (strings in, strings out) so every layout is unit-tested
// without a cluster; Finder adds the file system.
package cgroups

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path"
	"regexp"
	"strconv"
	"strings"
)

// Driver is the cgroup layout a pod's cgroup was recognised by.
type Driver string

const (
	// Cgroupfs is kubelet's cgroupfs driver: .../kubepods/<qos>/pod<uid>.
	Cgroupfs Driver = "cgroupfs"
	// Systemd is kubelet's systemd driver: .../kubepods-<qos>-pod<uid_>.slice.
	Systemd Driver = "systemd"
	// Parent means no Kubernetes layout was recognised: the pod is taken to be the parent of
	// this process's cgroup, and there is no pod UID to name it by.
	Parent Driver = "parent"
)

// PodPath is a pod's cgroup as found in a cgroup path.
type PodPath struct {
	// Path is the pod's cgroup, relative to the hierarchy root, e.g.
	// /kubepods/besteffort/pod0b1c.... It is a prefix of the path it was found in.
	Path string
	// UID is the pod's UID, with dashes (the systemd driver writes them as '_').
	UID string
	// Driver is the layout that matched.
	Driver Driver
}

var (
	// The systemd driver's pod slice; kind and other nested setups add a prefix such as
	// "kubelet-" to every slice name.
	systemdPod = regexp.MustCompile(`^(?:.+-)?kubepods(?:-besteffort|-burstable)?-pod([0-9A-Fa-f_]+)\.slice$`)
	// The cgroupfs driver's pod directory; it only counts below a kubepods directory.
	cgroupfsPod = regexp.MustCompile(`^pod([0-9A-Fa-f-]+)$`)
)

// ParsePath finds the pod cgroup in p, a cgroup path relative to the hierarchy root as
// /proc/self/cgroup shows it. When pods are nested (a cluster running in a pod), the
// innermost pod wins: it is the one this process belongs to.
func ParsePath(p string) (PodPath, bool) {
	if !strings.HasPrefix(p, "/") {
		return PodPath{}, false
	}
	segs := strings.Split(strings.Trim(path.Clean(p), "/"), "/")
	var found PodPath
	ok := false
	underKubepods := false
	for i, s := range segs {
		if m := systemdPod.FindStringSubmatch(s); m != nil {
			found = PodPath{"/" + strings.Join(segs[:i+1], "/"), strings.ReplaceAll(m[1], "_", "-"), Systemd}
			ok = true
		} else if m := cgroupfsPod.FindStringSubmatch(s); m != nil && underKubepods {
			found = PodPath{"/" + strings.Join(segs[:i+1], "/"), m[1], Cgroupfs}
			ok = true
		}
		if strings.Contains(s, "kubepods") {
			underKubepods = true
		}
	}
	return found, ok
}

// ProcCgroup is what /proc/<pid>/cgroup says.
type ProcCgroup struct {
	// V2 is the path in the cgroup v2 hierarchy (the "0::" line); "" if there is none.
	V2 string
	// V1 are the paths in the v1 hierarchies, deduplicated, in file order.
	V1 []string
}

// ParseProcCgroup parses the contents of /proc/<pid>/cgroup: lines of
// "hierarchy-id:controllers:path".
func ParseProcCgroup(content string) (ProcCgroup, error) {
	var pc ProcCgroup
	seen := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(content))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		id, rest, ok1 := strings.Cut(line, ":")
		ctrls, p, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 || !strings.HasPrefix(p, "/") {
			return ProcCgroup{}, fmt.Errorf("malformed cgroup line %q", line)
		}
		if id == "0" && ctrls == "" {
			pc.V2 = p
		} else if !seen[p] {
			seen[p] = true
			pc.V1 = append(pc.V1, p)
		}
	}
	return pc, sc.Err()
}

// Mount is one line of /proc/<pid>/mountinfo.
type Mount struct {
	// Root is the path inside the file system that is mounted at Point. For cgroup2 it is
	// the hierarchy path, relative to the reader's cgroup namespace ("/.." and below when
	// the mount shows cgroups outside that namespace).
	Root string
	// Point is where it is mounted.
	Point string
	// FSType is the file system type, e.g. "cgroup2".
	FSType string
}

// ParseMountinfo parses the contents of /proc/<pid>/mountinfo.
func ParseMountinfo(content string) ([]Mount, error) {
	var mounts []Mount
	sc := bufio.NewScanner(strings.NewReader(content))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		// id parent major:minor root point options [optional fields...] - fstype source superoptions
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 7 || sep < 0 || sep+1 >= len(f) {
			return nil, fmt.Errorf("malformed mountinfo line %q", sc.Text())
		}
		mounts = append(mounts, Mount{Root: unescape(f[3]), Point: unescape(f[4]), FSType: f[sep+1]})
	}
	return mounts, sc.Err()
}

// unescape undoes mountinfo's octal escapes (\040 for a space, and so on).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Cgroup2Mounts returns the cgroup2 mounts, in mountinfo order.
func Cgroup2Mounts(mounts []Mount) []Mount {
	var out []Mount
	for _, m := range mounts {
		if m.FSType == "cgroup2" {
			out = append(out, m)
		}
	}
	return out
}

// Resolve returns where the hierarchy path p is reachable through mount m, or false when m
// shows only a part of the hierarchy that does not hold p (a container's own view, or a
// mount outside the reader's cgroup namespace).
func Resolve(m Mount, p string) (string, bool) {
	// Clean would turn "/../.." into "/": look first.
	if m.Root == "/.." || strings.HasPrefix(m.Root, "/../") {
		return "", false
	}
	root := path.Clean(m.Root)
	p = path.Clean(p)
	switch {
	case root == "/":
		return path.Join(m.Point, p), true
	case p == root:
		return m.Point, true
	case strings.HasPrefix(p, root+"/"):
		return path.Join(m.Point, strings.TrimPrefix(p, root)), true
	}
	return "", false
}

// Found is where a pod's cgroup and this process's own cgroup are on the file system.
type Found struct {
	// Pod is the directory of the pod's cgroup v2.
	Pod string
	// Own is the directory of the cgroup v2 this process is in (at or below Pod).
	Own string
	// UID is the pod's UID, "" with the Parent driver.
	UID string
	// Driver is how Pod was recognised.
	Driver Driver
}

// ErrNotFound is wrapped by the errors of Locate and Finder.Find when no cgroup v2
// directory of this process could be reached.
var ErrNotFound = errors.New("pod cgroup not found")

// Locate finds the pod's cgroup from the contents of /proc/self/cgroup, given the cgroup2
// mounts to look through and a test for "is a cgroup v2 directory". It is pure but for
// isCgroup, so every layout can be tested on strings.
//
// The v2 path is tried first; on hybrid hosts the v1 paths are tried too, as runc mirrors
// them into the v2 hierarchy. A path in a recognised Kubernetes layout wins; failing that,
// the parent of this process's own v2 cgroup is returned with the Parent driver (the caller
// decides whether that is acceptable), unless this process sits at the root of what it can
// see, which is what a cgroup namespace shows.
func Locate(procCgroup string, mounts []Mount, isCgroup func(dir string) bool) (Found, error) {
	pc, err := ParseProcCgroup(procCgroup)
	if err != nil {
		return Found{}, err
	}
	if len(mounts) == 0 {
		return Found{}, fmt.Errorf("%w: no cgroup2 file system is mounted in this mount namespace (under `ip netns exec`, which remounts /sys, run divert with `nsenter --net=<netns>` instead); divert needs cgroup v2", ErrNotFound)
	}
	paths := pc.V1
	if pc.V2 != "" {
		paths = append([]string{pc.V2}, pc.V1...)
	}
	var fallback *Found
	for i, p := range paths {
		pp, recognised := ParsePath(p)
		for _, m := range mounts {
			own, ok := Resolve(m, p)
			if !ok || !isCgroup(own) {
				continue
			}
			if recognised {
				if pod, ok := Resolve(m, pp.Path); ok && isCgroup(pod) {
					return Found{Pod: pod, Own: own, UID: pp.UID, Driver: pp.Driver}, nil
				}
				continue
			}
			// Only this process's real v2 cgroup can stand for the pod's by parenthood, and
			// never the top of a mount: its parent would be outside what the mount shows.
			if i == 0 && pc.V2 != "" && fallback == nil && path.Clean(p) != "/" && own != path.Clean(m.Point) {
				fallback = &Found{Pod: path.Dir(own), Own: own, Driver: Parent}
			}
		}
	}
	if fallback != nil {
		return *fallback, nil
	}
	var points []string
	for _, m := range mounts {
		points = append(points, m.Point)
	}
	return Found{}, fmt.Errorf("%w: this process's cgroup %q is not below a Kubernetes pod cgroup under %s", ErrNotFound, pc.V2, strings.Join(points, ", "))
}

// Mountpoint is where this process sees cgroup v2 mounted: the first cgroup2 mount in
// /proc/self/mountinfo. It is /sys/fs/cgroup on a cgroup v2 host and e.g.
// /sys/fs/cgroup/unified on a hybrid one, so it is never assumed.
func Mountpoint() (string, error) {
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	all, err := ParseMountinfo(string(info))
	if err != nil {
		return "", err
	}
	if m := Cgroup2Mounts(all); len(m) > 0 {
		return m[0].Point, nil
	}
	return "", errors.New("no cgroup2 mount in /proc/self/mountinfo: divert needs cgroup v2")
}
