package testpod

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshdivert/divert/test/testutil"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
)

func TestMain(m *testing.M) {
	RunHelperIfRequested()
	os.Exit(m.Run())
}

const (
	appUID   = 1000
	proxyUID = 1337
)

var localhost = netip.MustParseAddr("127.0.0.1")

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

func host(t *testing.T, addr string) string {
	t.Helper()
	a, err := netip.ParseAddrPort(addr)
	require.NoError(t, err)
	return a.Addr().String()
}

func iptables(t *testing.T, netnsPath string, args ...string) {
	t.Helper()
	out, err := nsexec.CombinedOutput(netnsPath, exec.Command("iptables", args...))
	require.NoError(t, err, "iptables %v: %s", args, out)
}

func TestRemoteServerAnswersPodClient(t *testing.T) {
	p := New(t)
	remote := p.Net.Addrs[0]
	p.Net.Server(t, "outside", ap(remote, 80))

	res := p.Dial(t, appUID, appUID, Target{Dst: ap(remote, 80)}, Target{Dst: ap(remote, 81)})
	require.Empty(t, res[0].Err)
	require.Len(t, res[0].Hops, 1)
	assert.Equal(t, "outside", res[0].Hops[0].Who)
	assert.Equal(t, p.Addr.String(), host(t, res[0].Hops[0].Peer))
	assert.Equal(t, ap(remote, 80).String(), res[0].Hops[0].Local)
	assert.Equal(t, "connection refused", res[1].Err)
}

func TestCIDRAddressesAndBindSource(t *testing.T) {
	p := New(t)
	require.Len(t, p.Net.Addrs, 5)
	p.Net.Server(t, "any", netip.MustParseAddrPort("0.0.0.0:80"))
	var targets []Target
	for _, a := range p.Net.Addrs {
		targets = append(targets, Target{Dst: ap(a, 80)})
	}
	// And once more with the pod address bound explicitly before connect.
	targets = append(targets, Target{Dst: ap(p.Net.Addrs[0], 80), BindSrc: p.Addr})
	for i, r := range p.Dial(t, appUID, appUID, targets...) {
		require.Empty(t, r.Err, "target %d", i)
		assert.Equal(t, targets[i].Dst.String(), r.Hops[0].Local)
		assert.Equal(t, p.Addr.String(), host(t, r.Hops[0].Peer))
	}
}

func TestProcessIdentity(t *testing.T) {
	p := New(t)
	cgroupRel := strings.TrimPrefix(p.CgroupPath, cgroupRoot(t))
	var st unix.Stat_t
	require.NoError(t, unix.Stat(p.NetNSPath, &st))

	id := p.Whoami(t, proxyUID, proxyUID)
	assert.Equal(t, uint32(proxyUID), id.UID)
	assert.Equal(t, uint32(proxyUID), id.GID)
	assert.Equal(t, cgroupRel, id.Cgroup)
	assert.Equal(t, st.Ino, id.NetNS)
	assert.Empty(t, id.Groups, "supplementary groups must not leak root's")

	// Remote processes are in the network's cgroup, never a pod's.
	rid := p.Net.Whoami(t)
	assert.Equal(t, uint32(0), rid.UID)
	assert.Equal(t, strings.TrimPrefix(p.Net.CgroupPath, cgroupRoot(t)), rid.Cgroup)
	assert.NotEqual(t, id.NetNS, rid.NetNS)
}

func TestTwoPodsReachEachOther(t *testing.T) {
	n := NewNetwork(t)
	a, b := n.AddPod(t), n.AddPod(t)
	require.NotEqual(t, a.Addr, b.Addr)
	b.Server(t, "b-app", ap(b.Addr, 8080), appUID, appUID)
	a.Server(t, "a-app", ap(a.Addr, 8080), appUID, appUID)

	res := a.Dial(t, appUID, appUID, Target{Dst: ap(b.Addr, 8080)})
	require.Empty(t, res[0].Err)
	assert.Equal(t, "b-app", res[0].Hops[0].Who)
	assert.Equal(t, a.Addr.String(), host(t, res[0].Hops[0].Peer))

	res = b.Dial(t, appUID, appUID, Target{Dst: ap(a.Addr, 8080)})
	require.Empty(t, res[0].Err)
	assert.Equal(t, "a-app", res[0].Hops[0].Who)
}

func TestNoLeftovers(t *testing.T) {
	testutil.RequirePrivileged(t)
	var paths []string
	t.Run("use", func(t *testing.T) {
		n := NewNetwork(t)
		a, b := n.AddPod(t), n.AddPod(t)
		n.Server(t, "s", ap(n.Addrs[0], 80))
		// Non-root cannot bind below 1024 (ip_unprivileged_port_start is per netns).
		a.Server(t, "s", ap(a.Addr, 8080), proxyUID, proxyUID) // left running on purpose
		res := b.Dial(t, appUID, appUID, Target{Dst: ap(n.Addrs[0], 80)}, Target{Dst: ap(a.Addr, 8080)})
		require.Empty(t, res[0].Err)
		require.Empty(t, res[1].Err)
		paths = []string{n.NetNSPath, n.CgroupPath, a.NetNSPath, a.CgroupPath, b.NetNSPath, b.CgroupPath}
	})
	require.Len(t, paths, 6)
	mounts, err := os.ReadFile("/proc/mounts")
	require.NoError(t, err)
	for _, p := range paths {
		assert.NoFileExists(t, p)
		assert.NoDirExists(t, p)
		assert.NotContains(t, string(mounts), p)
	}
	left, _ := filepath.Glob(filepath.Join(netnsDir, strings.TrimSuffix(filepath.Base(paths[0]), "-remote")+"*"))
	assert.Empty(t, left)
}

func TestProxyReportWithoutNAT(t *testing.T) {
	p := New(t)
	p.Proxy(t, "proxy", ap(localhost, 15001), "report", proxyUID, proxyUID)
	res := p.Dial(t, appUID, appUID, Target{Dst: ap(localhost, 15001)})
	require.Empty(t, res[0].Err)
	require.Len(t, res[0].Hops, 1)
	h := res[0].Hops[0]
	assert.Equal(t, "proxy", h.Who)
	t.Logf("SO_ORIGINAL_DST without NAT: %q", h.OrigErr)
	assert.Empty(t, h.Orig)
	// No conntrack NAT entry: ENOENT (or ENOPROTOOPT when nf_conntrack is not loaded).
	assert.Contains(t, []string{"no such file or directory", "protocol not available"}, h.OrigErr)
}

func TestProxyReportWithRedirect(t *testing.T) {
	p := New(t)
	remote := ap(p.Net.Addrs[0], 80)
	p.Proxy(t, "proxy", netip.MustParseAddrPort("0.0.0.0:15001"), "report", proxyUID, proxyUID)
	iptables(t, p.NetNSPath, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", remote.Addr().String(),
		"-j", "REDIRECT", "--to-ports", "15001")

	res := p.Dial(t, appUID, appUID, Target{Dst: remote})
	require.Empty(t, res[0].Err)
	require.Len(t, res[0].Hops, 1)
	assert.Equal(t, "proxy", res[0].Hops[0].Who)
	assert.Empty(t, res[0].Hops[0].OrigErr)
	assert.Equal(t, remote.String(), res[0].Hops[0].Orig)
	assert.Equal(t, "127.0.0.1:15001", res[0].Hops[0].Local)
}

// An Istio-like sidecar built from iptables: outbound through 15001, inbound through 15006
// with the proxy forwarding from 127.0.0.6, the proxy's own uid excluded.
func TestProxyForwardOutboundAndInbound(t *testing.T) {
	p := New(t)
	remote := ap(p.Net.Addrs[0], 80)
	p.Net.Server(t, "outside", remote)
	p.Server(t, "app", netip.MustParseAddrPort("0.0.0.0:8080"), appUID, appUID)
	p.StartProxy(t, ProxyConfig{
		Name:       "sidecar",
		Listen:     []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:15001"), netip.MustParseAddrPort("0.0.0.0:15006")},
		Mode:       "forward",
		UID:        proxyUID,
		GID:        proxyUID,
		InboundSrc: netip.MustParseAddr("127.0.0.6"),
	})
	iptables(t, p.NetNSPath, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN")
	iptables(t, p.NetNSPath, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", remote.Addr().String(), "-j", "REDIRECT", "--to-ports", "15001")
	iptables(t, p.NetNSPath, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-i", "eth0", "-j", "REDIRECT", "--to-ports", "15006")

	out := p.Dial(t, appUID, appUID, Target{Dst: remote})[0]
	require.Empty(t, out.Err)
	require.Len(t, out.Hops, 2, "%+v", out)
	assert.Equal(t, "sidecar", out.Hops[0].Who)
	assert.Equal(t, remote.String(), out.Hops[0].Orig)
	assert.Equal(t, "outside", out.Hops[1].Who)
	assert.Equal(t, p.Addr.String(), host(t, out.Hops[1].Peer))

	in := p.Net.Dial(t, Target{Dst: ap(p.Addr, 8080)})[0]
	require.Empty(t, in.Err)
	require.Len(t, in.Hops, 2, "%+v", in)
	assert.Equal(t, "sidecar", in.Hops[0].Who)
	assert.Equal(t, ap(p.Addr, 8080).String(), in.Hops[0].Orig)
	assert.Equal(t, p.Gateway.String(), host(t, in.Hops[0].Peer))
	assert.Equal(t, "app", in.Hops[1].Who)
	assert.Equal(t, "127.0.0.6", host(t, in.Hops[1].Peer))
	assert.Equal(t, ap(p.Addr, 8080).String(), in.Hops[1].Local)
}

func TestDialTimeout(t *testing.T) {
	old := ClientTimeout
	ClientTimeout = 500e6 // 500ms
	t.Cleanup(func() { ClientTimeout = old })
	p := New(t)
	// Dropped SYNs: the client must report "timeout", not hang.
	iptables(t, p.NetNSPath, "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "DROP")
	res := p.Dial(t, appUID, appUID, Target{Dst: ap(p.Net.Addrs[0], 9)})
	assert.Equal(t, "timeout", res[0].Err)
}
