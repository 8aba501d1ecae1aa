package testpod

import (
	"net/netip"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/meshdivert/divert/internal/nsexec"
)

func ip6tables(t *testing.T, netnsPath string, args ...string) {
	t.Helper()
	out, err := nsexec.CombinedOutput(netnsPath, exec.Command("ip6tables", args...))
	require.NoError(t, err, "ip6tables %v: %s", args, out)
}

var (
	any4 = netip.IPv4Unspecified()
	any6 = netip.IPv6Unspecified()
	lo6  = netip.IPv6Loopback()
)

// A dual-stack pod reaches every remote address of both families, from Go's sockets (AF_INET
// and IPV6_V6ONLY AF_INET6) and from one dual-stack socket type (native IPv6 and v4-mapped),
// and the remote's dual-stack [::] listener sees the pod's address of the family used.
func TestDualStackPodReachesRemote(t *testing.T) {
	p := NewStack(t, DualStack)
	require.True(t, p.Addr.Is4())
	require.True(t, p.Addr6.Is6())
	assert.Equal(t, []netip.Addr{p.Addr, p.Addr6}, p.Addrs())
	require.Len(t, p.Net.Addrs6, 5)
	assert.Equal(t, PrimaryAddr6, p.Net.Addrs6[0])
	p.Net.Server(t, "outside", ap(any6, 80))

	var targets []Target
	var peers []netip.Addr
	for _, a := range p.Net.Addrs6 {
		targets = append(targets, Target{Dst: ap(a, 80)}, Target{Dst: ap(a, 80), Shape: Shape{DualStack: true}})
		peers = append(peers, p.Addr6, p.Addr6)
	}
	targets = append(targets,
		Target{Dst: ap(p.Net.Addrs[0], 80)},
		Target{Dst: ap(p.Net.Addrs[0], 80), Shape: Shape{DualStack: true}},
		Target{Dst: ap(p.Net.Addrs[0], 80), Shape: Shape{V4Mapped: true}, BindSrc: p.Addr},
		Target{Dst: ap(PrimaryAddr6, 80), BindSrc: p.Addr6},
		Target{Dst: ap(PrimaryAddr6, 80), BindSrc: p.Addr6, Shape: Shape{DualStack: true}},
	)
	peers = append(peers, p.Addr, p.Addr, p.Addr, p.Addr6, p.Addr6)
	for i, r := range p.Dial(t, appUID, appUID, targets...) {
		require.Empty(t, r.Err, "target %v", targets[i])
		require.Len(t, r.Hops, 1)
		assert.Equal(t, targets[i].Dst.String(), r.Hops[0].Local, "target %v", targets[i])
		assert.Equal(t, peers[i].String(), host(t, r.Hops[0].Peer), "target %v", targets[i])
	}
}

// ::1 is up in every pod, IPv4-only ones included, and the IPv6 gateway answers inbound.
func TestIPv6LoopbackAndInbound(t *testing.T) {
	n := NewNetwork(t)
	v4, dual := n.AddPod(t), n.AddStackPod(t, DualStack)
	assert.False(t, v4.Addr6.IsValid())
	assert.Equal(t, []netip.Addr{v4.Addr}, v4.Addrs())
	for _, p := range []*Pod{v4, dual} {
		p.Server(t, "loopback", ap(lo6, 8080), appUID, appUID)
		r := p.Dial(t, appUID, appUID, Target{Dst: ap(lo6, 8080)}, Target{Dst: ap(lo6, 8080), Shape: Shape{DualStack: true}})
		for _, res := range r {
			require.Empty(t, res.Err, "%s", p.Stack)
			assert.Equal(t, "loopback", res.Hops[0].Who)
			assert.Equal(t, "::1", host(t, res.Hops[0].Peer))
		}
	}
	dual.Server(t, "app", ap(any6, 8081), appUID, appUID)
	in := n.Dial(t, Target{Dst: ap(dual.Addr6, 8081)}, Target{Dst: ap(dual.Addr, 8081)})
	require.Empty(t, in[0].Err)
	assert.Equal(t, dual.Gateway6.String(), host(t, in[0].Hops[0].Peer))
	require.Empty(t, in[1].Err)
	assert.Equal(t, dual.Gateway.String(), host(t, in[1].Hops[0].Peer))
}

// An IPv6-only pod has no IPv4 route out but reaches the remote and other pods over IPv6.
func TestIPv6OnlyPod(t *testing.T) {
	n := NewNetwork(t)
	p, dual := n.AddStackPod(t, IPv6Only), n.AddStackPod(t, DualStack)
	assert.False(t, p.Addr.IsValid())
	assert.False(t, p.Gateway.IsValid())
	assert.Equal(t, []netip.Addr{p.Addr6}, p.Addrs())
	n.Server(t, "outside", ap(any6, 80))
	dual.Server(t, "dual-app", ap(dual.Addr6, 8080), appUID, appUID)

	res := p.Dial(t, appUID, appUID,
		Target{Dst: ap(PrimaryAddr6, 80)},
		Target{Dst: ap(dual.Addr6, 8080), Shape: Shape{DualStack: true}},
		Target{Dst: ap(PrimaryAddr, 80)},
	)
	require.Empty(t, res[0].Err)
	assert.Equal(t, p.Addr6.String(), host(t, res[0].Hops[0].Peer))
	require.Empty(t, res[1].Err)
	assert.Equal(t, "dual-app", res[1].Hops[0].Who)
	assert.Equal(t, p.Addr6.String(), host(t, res[1].Hops[0].Peer))
	assert.Equal(t, "network is unreachable", res[2].Err)
}

// The proxy reads an IPv6 connection's original destination with SOL_IPV6/
// IP6T_SO_ORIGINAL_DST, and an IPv4 one arriving on the same dual-stack listener with
// SOL_IP/SO_ORIGINAL_DST, as Envoy does; forwarding inbound binds ::6 for IPv6.
func TestProxyForwardIPv6(t *testing.T) {
	p := NewStack(t, DualStack)
	remote6, remote4 := ap(PrimaryAddr6, 80), ap(PrimaryAddr, 80)
	p.Net.Server(t, "outside", ap(any6, 80))
	p.Server(t, "app", ap(any6, 8080), appUID, appUID)
	// istio-iptables adds ::6 to lo for IPv6 pods: nothing else makes it bindable.
	out, err := nsexec.CombinedOutput(p.NetNSPath, exec.Command("ip", "-6", "addr", "add", "::6/128", "dev", "lo"))
	require.NoError(t, err, "%s", out)
	p.StartProxy(t, ProxyConfig{
		Name:        "sidecar",
		Listen:      []netip.AddrPort{ap(any4, 15001), ap(any6, 15001), ap(any6, 15006)},
		V6Only:      true, // [::]:15001 next to 0.0.0.0:15001; [::]:15006 then IPv6 only too
		Mode:        "forward",
		UID:         proxyUID,
		GID:         proxyUID,
		InboundSrc:  netip.MustParseAddr("127.0.0.6"),
		InboundSrc6: netip.MustParseAddr("::6"),
	})
	for _, cmd := range [][]string{
		{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"},
		{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001"},
	} {
		iptables(t, p.NetNSPath, cmd...)
		ip6tables(t, p.NetNSPath, cmd...)
	}
	ip6tables(t, p.NetNSPath, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-i", "eth0", "-j", "REDIRECT", "--to-ports", "15006")

	res := p.Dial(t, appUID, appUID, Target{Dst: remote6}, Target{Dst: remote6, Shape: Shape{DualStack: true}},
		Target{Dst: remote4}, Target{Dst: remote4, Shape: Shape{V4Mapped: true}})
	for i, want := range []struct {
		listener string
		orig     netip.AddrPort
		peer     netip.Addr
	}{
		{"[::]:15001", remote6, p.Addr6},
		{"[::]:15001", remote6, p.Addr6},
		{"0.0.0.0:15001", remote4, p.Addr},
		{"0.0.0.0:15001", remote4, p.Addr},
	} {
		r := res[i]
		require.Empty(t, r.Err, "%d", i)
		require.Len(t, r.Hops, 2, "%d: %+v", i, r)
		assert.Equal(t, want.listener, r.Hops[0].Listener, "%d", i)
		assert.Empty(t, r.Hops[0].OrigErr, "%d", i)
		assert.Equal(t, want.orig.String(), r.Hops[0].Orig, "%d", i)
		assert.Equal(t, "outside", r.Hops[1].Who, "%d", i)
		assert.Equal(t, want.peer.String(), host(t, r.Hops[1].Peer), "%d", i)
	}

	in := p.Net.Dial(t, Target{Dst: ap(p.Addr6, 8080)})[0]
	require.Empty(t, in.Err)
	require.Len(t, in.Hops, 2, "%+v", in)
	assert.Equal(t, "[::]:15006", in.Hops[0].Listener)
	assert.Equal(t, ap(p.Addr6, 8080).String(), in.Hops[0].Orig)
	assert.Equal(t, "app", in.Hops[1].Who)
	assert.Equal(t, "::6", host(t, in.Hops[1].Peer))
	assert.Equal(t, ap(p.Addr6, 8080).String(), in.Hops[1].Local)
}

// IPv6 DNS-style exchanges: a UDP server on an IPv6 address answers from it, over UDP
// (connected and not) and TCP.
func TestIPv6Query(t *testing.T) {
	p := NewStack(t, DualStack)
	ns := ap(p.Net.Addrs6[1], 53)
	p.Net.UDPServer(t, "ns6", ns)
	p.Net.Server(t, "ns6-tcp", ns)
	for _, kind := range []QueryKind{UDPUnconnected, UDPConnected, TCPQuery} {
		r := p.Query(t, appUID, appUID, Query{Kind: kind, Dst: ns})
		require.Empty(t, r.Err, "%s", kind)
		if kind == TCPQuery {
			assert.Equal(t, "ns6-tcp", r.Who)
			assert.Equal(t, ns.String(), r.Peer)
			continue
		}
		assert.Equal(t, "ns6", r.Who, "%s", kind)
		assert.Equal(t, ns.String(), r.From, "%s", kind)
	}
}
