// Target checks: the pod's cgroup (a cgroup v2 directory, its id) and network namespace
// (its inode, its addresses), and whether a pinned link is attached to them.

package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/internal/nsexec"
)

// target identifies what a pod's links must be attached to.
type target struct{ cgroupID, netnsIno uint64 }

// belongsTo checks a pinned link is attached where this pod's links must be.
func (t target) belongsTo(info *link.Info) bool {
	if cg := info.Cgroup(); cg != nil {
		return cg.CgroupId == t.cgroupID
	}
	if ns := info.NetNs(); ns != nil {
		return uint64(ns.NetnsInode) == t.netnsIno
	}
	return false
}

// cgroupID checks that path is a cgroup v2 directory and returns its id (the inode number).
func cgroupID(path string) (uint64, error) {
	if path == "" {
		return 0, &InputError{Field: "cgroup", Value: path, Msg: "required: the pod's cgroup v2 directory"}
	}
	on, err := cgroups.OnCgroup2(path)
	if err != nil {
		return 0, &InputError{Field: "cgroup", Value: path, Msg: fmt.Sprintf("%v; pass the pod's cgroup v2 directory", unwrapPathError(err))}
	}
	if !on {
		return 0, &InputError{Field: "cgroup", Value: path, Msg: "not on a cgroup v2 file system; pass a directory under the cgroup2 mount (see /proc/mounts)"}
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, &InputError{Field: "cgroup", Value: path, Msg: unwrapPathError(err).Error()}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return 0, &InputError{Field: "cgroup", Value: path, Msg: "not a directory; pass the pod's cgroup v2 directory"}
	}
	return st.Ino, nil
}

// LocalAddrs returns the addresses of the network namespace at path, both families: the
// destinations iptables would route via lo ("-o lo"), besides 127.0.0.0/8 and ::1. IPv6
// link-local addresses are left out, as istio leaves them out of a pod's addresses: the
// kernel gives every interface one, a moment after it comes up, so whether one would be
// listed depended on timing (seen in the VM guests); a v4-mapped address is IPv4.
func LocalAddrs(netnsPath string) ([]netip.Addr, error) {
	if netnsPath == "" {
		return nil, &InputError{Field: "netns", Value: netnsPath, Msg: "required: a path to the pod's network namespace, like /proc/<pid>/ns/net or /run/netns/<name>"}
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(netnsPath, &fs); err != nil {
		return nil, &InputError{Field: "netns", Value: netnsPath, Msg: unwrapPathError(err).Error() + "; pass the pod's network namespace, like /proc/<pid>/ns/net or /run/netns/<name>"}
	}
	if fs.Type != unix.NSFS_MAGIC {
		return nil, &InputError{Field: "netns", Value: netnsPath, Msg: "not a network namespace; pass /proc/<pid>/ns/net or a bind mount of it"}
	}
	var addrs []netip.Addr
	err := nsexec.Do(netnsPath, func() error {
		list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range list {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			if ip = ip.Unmap(); !ip.IsLoopback() && !(ip.Is6() && ip.IsLinkLocalUnicast()) {
				addrs = append(addrs, ip)
			}
		}
		return nil
	})
	if err != nil {
		return nil, &InputError{Field: "netns", Value: netnsPath, Msg: err.Error()}
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	return slices.Compact(addrs), nil
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
