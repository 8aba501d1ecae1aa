package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/divertest"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testpod"
)

var (
	any6           = netip.IPv6Unspecified()
	passthrough6   = netip.MustParseAddr("::6")
	localhost6Port = func(port uint16) string { return netip.AddrPortFrom(netip.IPv6Loopback(), port).String() }
)

// ipv6Config is the policy of istio-iptables' flags args, IPv6 captured too: the
// ip6tables rules istio writes for an IPv6 or dual-stack pod.
func ipv6Config(t *testing.T, args ...string) *policy.Config {
	t.Helper()
	cfg := divertest.Config(t, args...)
	cfg.IPv6 = true
	return cfg
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// An app's native IPv6 connections reach the proxy at [::1]:15001, and the proxy reads each
// one's original destination with getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST), as Envoy
// does; from Go's IPv6-only sockets and from dual-stack sockets (IPV6_V6ONLY off), which
// also dial IPv4 as ::ffff:a.b.c.d (read with SOL_IP, IPv4 on the wire). One dual-stack
// listener takes both families, as does a pair of 0.0.0.0 and IPv6-only [::] listeners
// (Envoy's in dual stack). Each family's verdicts are counted apart.
func TestIPv6Outbound(t *testing.T) {
	for _, c := range []struct {
		name   string
		stack  testpod.Stack
		listen []netip.AddrPort
		v6only bool
	}{
		{"dual-stack", testpod.DualStack, []netip.AddrPort{ap(any6, 15001)}, false},
		{"dual-stack envoy listeners", testpod.DualStack, []netip.AddrPort{ap(anyAddr, 15001), ap(any6, 15001)}, true},
		{"ipv6-only", testpod.IPv6Only, []netip.AddrPort{ap(any6, 15001)}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			pod := testpod.NewStack(t, c.stack)
			att := divertest.Attach(t, pod, divertest.BPFFS(t), ipv6Config(t))
			pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: proxyUID, GID: proxyUID,
				Listen: c.listen, V6Only: c.v6only})
			var targets []testpod.Target
			for _, a := range pod.Net.Addrs6 {
				targets = append(targets, testpod.Target{Dst: ap(a, 80)}, testpod.Target{Dst: ap(a, 80), DualStack: true})
			}
			native := len(targets)
			if pod.Addr.IsValid() {
				d4 := ap(pod.Net.Addrs[1], 80)
				targets = append(targets, testpod.Target{Dst: d4, DualStack: true}, testpod.Target{Dst: d4})
			}
			for i, r := range pod.Dial(t, appUID, appUID, targets...) {
				dst := targets[i].Dst
				if r.Err != "" || len(r.Hops) != 1 || r.Hops[0].Who != "proxy" || r.Hops[0].Orig != dst.String() {
					t.Errorf("%v: want the proxy reading %s, got %+v", targets[i], dst, r)
					continue
				}
				// The rewrite goes to the family's localhost, as REDIRECT does for locally made
				// connections; on a listener of that family when there is one per family.
				lo, listener := "127.0.0.1:15001", c.listen[0].String()
				if dst.Addr().Is6() {
					lo, listener = localhost6Port(15001), c.listen[len(c.listen)-1].String()
				}
				if h := r.Hops[0]; h.Local != lo || h.Listener != listener {
					t.Errorf("%v: accepted at %s on %s, want %s on %s", targets[i], h.Local, h.Listener, lo, listener)
				}
			}
			v4, v6 := att.CountersByFamily(t, maps.IPv4), att.CountersByFamily(t, maps.IPv6)
			if got := v6[policy.ReasonIncludedCIDR]; got != uint64(native) {
				t.Errorf("IPv6 included-cidr counted %d, want %d", got, native)
			}
			if got := v4[policy.ReasonIncludedCIDR]; got != uint64(len(targets)-native) {
				t.Errorf("IPv4 included-cidr counted %d, want %d", got, len(targets)-native)
			}
			att.NoDrops(t)
		})
	}
}

// Inbound over IPv6 to a pod: sk_lookup hands connections to included ports to the
// proxy's dual-stack [::]:15006 listener without NAT (the proxy reads the original
// destination, which is also its socket's own address), and the proxy forwards them to
// the app from ::6, which Attach put on lo as istio-iptables does; IPv4 goes through the
// same listener and reaches the app from 127.0.0.6. An excluded port reaches the app
// directly.
func TestIPv6Inbound(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), ipv6Config(t))
	addrs, err := loader.LocalAddrs(pod.NetNSPath)
	if err != nil || !slices.Contains(addrs, passthrough6) {
		t.Fatalf("attach did not add %s to the pod: %v %v", passthrough6, addrs, err)
	}
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "forward", UID: proxyUID, GID: proxyUID,
		Listen:     []netip.AddrPort{ap(any6, 15001), ap(any6, 15006)},
		InboundSrc: policy.InboundPassthroughSource, InboundSrc6: passthrough6})
	pod.Server(t, "app", ap(any6, 8080), appUID, appUID)
	pod.Server(t, "health", ap(any6, 15021), appUID, appUID)

	for _, c := range []struct {
		dst  netip.AddrPort
		want []string
	}{
		{ap(pod.Addr6, 8080), []string{
			fmt.Sprintf("proxy via [::]:15006 read %s", ap(pod.Addr6, 8080)),
			fmt.Sprintf("app at %s from ::6", ap(pod.Addr6, 8080))}},
		{ap(pod.Addr, 8080), []string{
			fmt.Sprintf("proxy via [::]:15006 read %s", ap(pod.Addr, 8080)),
			fmt.Sprintf("app at %s from 127.0.0.6", ap(pod.Addr, 8080))}},
		{ap(pod.Addr6, 15021), []string{fmt.Sprintf("health at %s from %s", ap(pod.Addr6, 15021), pod.Gateway6)}},
	} {
		res := pod.Net.Dial(t, testpod.Target{Dst: c.dst})[0]
		var hops []string
		for _, h := range res.Hops {
			hops = append(hops, hopSummary(pod, h))
		}
		if res.Err != "" || !slices.Equal(hops, c.want) {
			t.Errorf("remote -> %s: %+v\n  hops %q\n  want %q", c.dst, res, hops, c.want)
		}
	}
	v4, v6 := att.CountersByFamily(t, maps.IPv4), att.CountersByFamily(t, maps.IPv6)
	if v6[policy.ReasonInboundIncludedPort] != 1 || v6[policy.ReasonInboundExcludedPort] != 1 || v4[policy.ReasonInboundIncludedPort] != 1 {
		t.Errorf("inbound counters: IPv6 %v, IPv4 %v; want one included port each, one excluded IPv6", v6, v4)
	}
	// The proxy's forwarding connections, as uid 1337 from the passthrough sources.
	if v6[policy.ReasonInboundPassthrough] != 1 || v4[policy.ReasonInboundPassthrough] != 1 {
		t.Errorf("inbound-passthrough counted IPv6 %d, IPv4 %d; want 1 each", v6[policy.ReasonInboundPassthrough], v4[policy.ReasonInboundPassthrough])
	}
	att.NoDrops(t)
}

// The whole sidecar path over IPv6 between two dual-stack pods: app A -> captured
// outbound -> proxy A -> pod B -> captured inbound -> proxy B -> app B from ::6.
func TestIPv6SidecarPath(t *testing.T) {
	net := testpod.NewNetwork(t)
	a, b := net.AddStackPod(t, testpod.DualStack), net.AddStackPod(t, testpod.DualStack)
	for _, p := range []*testpod.Pod{a, b} {
		divertest.Attach(t, p, divertest.BPFFS(t), ipv6Config(t))
		p.StartProxy(t, testpod.ProxyConfig{Name: "proxy-" + strings.TrimPrefix(p.Name, net.Name), Mode: "forward", UID: proxyUID, GID: proxyUID,
			Listen:     []netip.AddrPort{ap(any6, 15001), ap(any6, 15006)},
			InboundSrc: policy.InboundPassthroughSource, InboundSrc6: passthrough6})
	}
	b.Server(t, "app-b", ap(any6, 8080), appUID, appUID)
	dst := ap(b.Addr6, 8080)
	res := a.Dial(t, appUID, appUID, testpod.Target{Dst: dst})[0]
	var hops []string
	for _, h := range res.Hops {
		s := hopSummary(b, h)
		hops = append(hops, s[strings.Index(s, " "):]) // the proxies' names carry the pods'
	}
	want := []string{
		fmt.Sprintf(" via [::]:15001 read %s", dst),
		fmt.Sprintf(" via [::]:15006 read %s", dst),
		fmt.Sprintf(" at %s from ::6", dst),
	}
	if res.Err != "" || !slices.Equal(hops, want) {
		t.Fatalf("app A -> %s: %+v\n  hops %q\n  want %q", dst, res, hops, want)
	}
}
