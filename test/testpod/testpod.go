// Package testpod builds simulated meshed pods for privileged end-to-end tests.
//
// A Network is a "remote" network namespace acting as router and outside world. A Pod is a
// network namespace hanging off it by a veth pair, plus a cgroup v2 directory. Processes
// that belong to the pod are children started inside the pod's netns and cgroup as a
// requested uid/gid, because cgroup membership (what eBPF cgroup programs see) is per
// process. The children are the test binary itself re-executed as a small helper (server,
// proxy, client, id): every package using testpod must call RunHelperIfRequested first thing
// in TestMain.
//
// Addressing uses the RFC 2544 benchmarking range so test traffic never looks like a real
// network. Inside one Network, pod k (1..254) gets 198.18.k.2/24 on eth0 and the remote end
// of its veth is 198.18.k.1, the pod's default gateway. The remote netns forwards between
// pods and owns, on its lo, the primary address 198.18.0.1 and four CIDR-test addresses
// 198.19.X.{1,65,129,193}, X being a per-process network counter. All addresses live inside
// namespaces created here, so tests running in parallel processes cannot collide; only the
// /run/netns names are global and carry a random part.
//
// Pods can be dual-stack or IPv6-only (NewStack, AddStackPod; see ipv6.go for the IPv6
// addressing, in fd00::/8, the unique-local range). IPv4-only pods, the default, look
// exactly as described above: nothing IPv6 is configured for them beyond the kernel's own
// defaults.
package testpod

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshdivert/divert/test/testutil"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/internal/nsexec"
)

const (
	netnsDir     = "/run/netns"
	namePrefix   = "dvt-"
	cgroupParent = "divert-test"
)

// PrimaryAddr is the remote netns's first address (Network.Addrs[0]), the usual "outside"
// destination for pod clients.
var PrimaryAddr = netip.MustParseAddr("198.18.0.1")

// Network is a "remote" netns acting as router/outside world that pods hang off.
type Network struct {
	Name       string       // dvt-<rand>-remote; pods are dvt-<rand>-p<k>
	NetNSPath  string       // /run/netns/<Name>
	CgroupPath string       // cgroup for processes started in the remote netns, never a pod's
	Addrs      []netip.Addr // PrimaryAddr, then 198.19.X.1, .65, .129, .193 (all on lo)

	// Addrs6 are the IPv6 counterparts of Addrs (PrimaryAddr6, then fd00:19:0:X::1,
	// fd00:19:0:X:4000::1, :8000::1 and :c000::1, all on lo), empty until the first pod
	// with IPv6 is added: only then is IPv6 configured in the remote netns.
	Addrs6 []netip.Addr

	base string       // dvt-<rand>
	x    byte         // this network's X in 198.19.X.0/24 and fd00:19:0:X::/64
	pods atomic.Int32 // pods added so far; pod k uses 198.18.k.0/24 (and fd00:18:0:k::/64)
	v6mu sync.Mutex   // guards Addrs6 while the first IPv6 pod sets the remote up
}

// Pod is a network namespace with eth0 towards its Network and its own cgroup.
type Pod struct {
	Name       string
	NetNSPath  string
	CgroupPath string     // <cgroup2 mount>/divert-test/<Name>
	Addr       netip.Addr // eth0, 198.18.k.2; invalid in an IPv6-only pod
	Gateway    netip.Addr // remote end of the veth, 198.18.k.1; invalid in an IPv6-only pod
	Addr6      netip.Addr // eth0, fd00:18:0:k::2; valid only in dual-stack and IPv6-only pods
	Gateway6   netip.Addr // remote end of the veth, fd00:18:0:k::1 (valid with Addr6)
	Stack      Stack
	Net        *Network
}

var netCount atomic.Uint32 // gives each Network of this process its 198.19.X.0/24

// New creates a Network with a single IPv4-only Pod, for the common single-pod test.
func New(tb testing.TB) *Pod {
	tb.Helper()
	return NewNetwork(tb).AddPod(tb)
}

// NewStack creates a Network with a single Pod with the address families of s.
func NewStack(tb testing.TB, s Stack) *Pod {
	tb.Helper()
	return NewNetwork(tb).AddStackPod(tb, s)
}

// NewNetwork creates the remote netns; everything is removed in tb.Cleanup.
func NewNetwork(tb testing.TB) *Network {
	tb.Helper()
	testutil.RequirePrivileged(tb)
	n := &Network{base: uniqueBase(tb)}
	n.Name = n.base + "-remote"
	n.NetNSPath = newNetNS(tb, n.Name)
	n.CgroupPath = newCgroup(tb, n.Name)

	n.x = byte(netCount.Add(1)%254 + 1)
	n.Addrs = []netip.Addr{PrimaryAddr}
	for _, last := range []byte{1, 65, 129, 193} {
		n.Addrs = append(n.Addrs, netip.AddrFrom4([4]byte{198, 19, n.x, last}))
	}

	h := handle(tb, n.NetNSPath)
	lo := linkUp(tb, h, "lo")
	for _, a := range n.Addrs {
		addAddr(tb, h, lo, netip.PrefixFrom(a, 32))
	}
	// Forwarding only inside the remote netns: /proc/sys/net shows the netns of the thread
	// that opens it, so write it from a thread that joined the namespace.
	must(tb, nsexec.Do(n.NetNSPath, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0)
	}), "enable ip_forward in remote netns")
	return n
}

// AddPod creates an IPv4-only pod netns and cgroup and wires it to the Network.
func (n *Network) AddPod(tb testing.TB) *Pod {
	tb.Helper()
	return n.AddStackPod(tb, IPv4Only)
}

// AddStackPod creates a pod with the address families of s and wires it to the Network.
func (n *Network) AddStackPod(tb testing.TB, s Stack) *Pod {
	tb.Helper()
	k := int(n.pods.Add(1))
	if k > 254 {
		tb.Fatalf("testpod: more than 254 pods on network %s", n.Name)
	}
	p := &Pod{Name: fmt.Sprintf("%s-p%d", n.base, k), Stack: s, Net: n}
	if s != IPv6Only {
		p.Addr = netip.AddrFrom4([4]byte{198, 18, byte(k), 2})
		p.Gateway = netip.AddrFrom4([4]byte{198, 18, byte(k), 1})
	}
	if s != IPv4Only {
		p.Addr6, p.Gateway6 = podAddrs6(k)
		n.enableIPv6(tb)
	}
	p.NetNSPath = newNetNS(tb, p.Name)
	p.CgroupPath = newCgroup(tb, p.Name)
	if p.Addr6.IsValid() {
		must(tb, nsexec.Do(p.NetNSPath, noDAD), "turn IPv6 DAD off in pod netns") // before eth0 arrives
	}

	podNS, err := netns.GetFromPath(p.NetNSPath)
	must(tb, err, "open pod netns")
	defer podNS.Close()

	// Create the pair inside the remote netns with its peer born in the pod as eth0, so no
	// interface ever appears in the host netns (no name clashes with parallel test runs).
	remote := handle(tb, n.NetNSPath)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: fmt.Sprintf("p%d", k)},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(podNS),
	}
	must(tb, remote.LinkAdd(veth), "create veth")
	peer := linkUp(tb, remote, veth.Name)

	h := handle(tb, p.NetNSPath)
	linkUp(tb, h, "lo")
	eth0 := linkUp(tb, h, "eth0")
	if p.Addr6.IsValid() {
		addIPv6(tb, h, remote, eth0, peer, p)
	}
	if !p.Addr.IsValid() {
		return p
	}
	addAddr(tb, remote, peer, netip.PrefixFrom(p.Gateway, 24))
	addAddr(tb, h, eth0, netip.PrefixFrom(p.Addr, 24))
	gw := p.Gateway.AsSlice()
	must(tb, h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: gw}), "add default route")
	// Redundant with the default route today, but keeps the CIDR-test addresses reachable
	// if a test replaces the default route.
	_, cidr, _ := net.ParseCIDR("198.19.0.0/16")
	must(tb, h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: cidr, Gw: gw}), "add 198.19/16 route")
	return p
}

// uniqueBase picks dvt-<rand> not used by any netns or cgroup on the machine.
func uniqueBase(tb testing.TB) string {
	for range 100 {
		var b [3]byte
		_, _ = rand.Read(b[:])
		base := namePrefix + hex.EncodeToString(b[:])
		inNetns, _ := filepath.Glob(filepath.Join(netnsDir, base+"-*"))
		inCgroup, _ := filepath.Glob(filepath.Join(cgroupRoot(tb), cgroupParent, base+"-*"))
		if len(inNetns)+len(inCgroup) == 0 {
			return base // newNetNS's O_EXCL still guards against a racing creator
		}
	}
	tb.Fatalf("testpod: no free network name")
	return ""
}

var (
	netnsDirOnce sync.Once
	netnsDirErr  error
)

// shareNetnsDir makes /run/netns a shared mount point the way `ip netns add` does the first
// time it runs on a host. It must happen before this process mounts any netns there: if
// `ip netns add` (run by some tests, in this process or a parallel one) did it later, its
// recursive bind would copy our netns mounts into the new /run/netns and leave the originals
// hidden under it, where no unmount by path reaches them and the file stays busy for good
// (seen on hosts whose / is private, such as CI's). Shared, an unmount propagates to copies.
func shareNetnsDir() error {
	netnsDirOnce.Do(func() {
		if err := os.MkdirAll(netnsDir, 0o755); err != nil {
			netnsDirErr = err
			return
		}
		makeShared := func() error { return unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "") }
		err := makeShared()
		if err == unix.EINVAL { // not a mount point yet
			if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
				netnsDirErr = fmt.Errorf("bind %s on itself: %w", netnsDir, err)
				return
			}
			err = makeShared()
		}
		if err != nil {
			netnsDirErr = fmt.Errorf("mount --make-shared %s: %w", netnsDir, err)
		}
	})
	return netnsDirErr
}

// newNetNS creates a named netns (like `ip netns add`) and registers its deletion.
func newNetNS(tb testing.TB, name string) string {
	tb.Helper()
	path := filepath.Join(netnsDir, name)
	must(tb, shareNetnsDir(), "prepare "+netnsDir)
	errc := make(chan error, 1)
	go func() {
		// unshare changes only this thread; it is never unlocked, so the runtime throws the
		// thread away when the goroutine ends instead of reusing it in the wrong netns.
		runtime.LockOSThread()
		errc <- func() error {
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				return fmt.Errorf("unshare: %w", err)
			}
			f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
			if err != nil {
				return err
			}
			f.Close()
			if err := unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, ""); err != nil {
				os.Remove(path)
				return fmt.Errorf("bind mount netns on %s: %w", path, err)
			}
			return nil
		}()
	}()
	must(tb, <-errc, "create netns "+name)
	tb.Cleanup(func() {
		// Unmounting drops the last reference once no process lives in it; the veth goes
		// with the namespace. The bind mount can still be stacked when another process
		// bound /run/netns on itself between shareNetnsDir and this mount: unmount until
		// the path is no mountpoint.
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			tb.Errorf("testpod: unmount %s: %v", path, err)
		}
		err := os.Remove(path)
		for i := 0; i < 8 && errors.Is(err, unix.EBUSY); i++ {
			if uerr := unix.Unmount(path, unix.MNT_DETACH); uerr != nil {
				break
			}
			err = os.Remove(path)
		}
		if err != nil {
			tb.Errorf("testpod: %v", err)
		}
	})
	return path
}

var (
	cgroupOnce sync.Once
	cgroupMnt  string
	cgroupErr  error
)

// cgroupRoot is the cgroup v2 mount: /sys/fs/cgroup on unified hosts but e.g.
// /sys/fs/cgroup/unified on hybrid ones.
func cgroupRoot(tb testing.TB) string {
	tb.Helper()
	cgroupOnce.Do(func() {
		cgroupMnt, cgroupErr = cgroups.Mountpoint()
	})
	must(tb, cgroupErr, "find cgroup v2 mount")
	return cgroupMnt
}

// newCgroup creates <cgroup2>/divert-test/<name> and registers its removal.
func newCgroup(tb testing.TB, name string) string {
	tb.Helper()
	parent := filepath.Join(cgroupRoot(tb), cgroupParent)
	path := filepath.Join(parent, name)
	must(tb, os.MkdirAll(parent, 0o755), "create cgroup parent")
	must(tb, os.Mkdir(path, 0o755), "create cgroup")
	tb.Cleanup(func() {
		// Processes were stopped and reaped by earlier cleanups, but the kernel may take a
		// moment to let go of the cgroup: retry EBUSY briefly.
		var err error
		for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if err = unix.Rmdir(path); err != unix.EBUSY || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			procs, _ := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			tb.Errorf("testpod: rmdir %s: %v (pids: %q)", path, err, procs)
		}
		_ = unix.Rmdir(parent) // shared with parallel runs: fine if still in use
	})
	return path
}

// handle returns a netlink handle whose socket lives in the netns at path.
func handle(tb testing.TB, path string) *netlink.Handle {
	tb.Helper()
	ns, err := netns.GetFromPath(path)
	must(tb, err, "open netns "+path)
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	must(tb, err, "netlink handle in "+path)
	tb.Cleanup(h.Close)
	return h
}

func linkUp(tb testing.TB, h *netlink.Handle, name string) netlink.Link {
	tb.Helper()
	l, err := h.LinkByName(name)
	must(tb, err, "find link "+name)
	must(tb, h.LinkSetUp(l), "set "+name+" up")
	return l
}

// addAddr adds p to l. IPv6 addresses skip duplicate address detection (nodad): they are
// usable at once instead of tentative for a second or two, and no other host shares the link.
func addAddr(tb testing.TB, h *netlink.Handle, l netlink.Link, p netip.Prefix) {
	tb.Helper()
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	must(tb, h.AddrAdd(l, a), fmt.Sprintf("add %s to %s", p, l.Attrs().Name))
}

func must(tb testing.TB, err error, what string) {
	tb.Helper()
	if err != nil {
		tb.Fatalf("testpod: %s: %v", what, err)
	}
}

// The main goroutine keeps the main thread: testpod (and tests) unshare a network namespace
// on threads locked for good, and a goroutine that did that on the main thread would leave
// it, the thread group leader, in the pod's netns — /proc/<pid>/ns/net would then name the
// wrong namespace for the whole process (seen as TestSocketOwners failing in a guest).
func init() { runtime.LockOSThread() }

// Sysctl sets a per-netns sysctl (e.g. "net/ipv4/tcp_fastopen") in the pod's netns; it goes
// with the netns.
func (p *Pod) Sysctl(tb testing.TB, name, value string) {
	tb.Helper()
	// /proc/sys/net shows the netns of the thread that opens it.
	must(tb, nsexec.Do(p.NetNSPath, func() error {
		return os.WriteFile(filepath.Join("/proc/sys", name), []byte(value+"\n"), 0)
	}), "set "+name+" in pod netns")
}
