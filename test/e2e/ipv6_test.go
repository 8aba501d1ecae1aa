package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
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

// decisions names, sorted, the connections a divertest.VerdictCheck matched: the reason
// and the original destination, and for the pod's own the address it came from.
func decisions(es []divertest.TraceEvent) []string {
	var out []string
	for _, e := range es {
		s := fmt.Sprintf("%s to %s", e.Reason, e.Dst)
		if !e.Inbound {
			s += " from " + e.Src.Addr().String()
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

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
				targets = append(targets, testpod.Target{Dst: ap(a, 80)}, testpod.Target{Dst: ap(a, 80), Shape: testpod.Shape{DualStack: true}})
			}
			native := len(targets)
			if pod.Addr.IsValid() {
				d4 := ap(pod.Net.Addrs[1], 80)
				targets = append(targets, testpod.Target{Dst: d4, Shape: testpod.Shape{DualStack: true}}, testpod.Target{Dst: d4})
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
	cfg := ipv6Config(t)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), cfg)
	addrs, err := loader.LocalAddrs(pod.NetNSPath)
	if err != nil || !slices.Contains(addrs, passthrough6) {
		t.Fatalf("attach did not add %s to the pod: %v %v", passthrough6, addrs, err)
	}
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "forward", UID: proxyUID, GID: proxyUID,
		Listen:     []netip.AddrPort{ap(any6, 15001), ap(any6, 15006)},
		InboundSrc: policy.InboundPassthroughSource, InboundSrc6: passthrough6})
	pod.Server(t, "app", ap(any6, 8080), appUID, appUID)
	pod.Server(t, "health", ap(any6, 15021), appUID, appUID)
	vc := divertest.NewVerdictCheck(t, att)
	vc.Begin(t, cfg)

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
	// Exactly these decisions, each counted in its family (sk_lookup may run twice for one
	// connection: divertest.VerdictCheck): the three connections in, and the proxy's two
	// forwarding connections, as uid 1337 from the passthrough sources.
	decided := vc.Check(t, []policy.Reason{policy.ReasonInboundIncludedPort, policy.ReasonInboundIncludedPort,
		policy.ReasonInboundExcludedPort, policy.ReasonInboundPassthrough, policy.ReasonInboundPassthrough}, "remote -> pod")
	want := []string{
		fmt.Sprintf("inbound-included-port to %s", ap(pod.Addr6, 8080)),
		fmt.Sprintf("inbound-included-port to %s", ap(pod.Addr, 8080)),
		fmt.Sprintf("inbound-excluded-port to %s", ap(pod.Addr6, 15021)),
		fmt.Sprintf("inbound-passthrough to %s from ::6", ap(pod.Addr6, 8080)),
		fmt.Sprintf("inbound-passthrough to %s from 127.0.0.6", ap(pod.Addr, 8080)),
	}
	if got := decisions(decided); !slices.Equal(got, slices.Sorted(slices.Values(want))) {
		t.Errorf("decided\n  %q\nwant\n  %q", got, want)
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

// istio's ip6tables rules, one by one, as the eBPF backend applies them to native IPv6
// (ISTIO_OUTPUT with ::6 and ::1): who answers each connection, the proxy (reading its
// original destination) or the server it was meant for. The model and ip6tables are held
// to the same outcomes by the parity suite; this is the eBPF side on its own.
func TestIPv6Rules(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	opts := divertest.BPFFS(t)
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: proxyUID, GID: proxyUID,
		Listen: []netip.AddrPort{ap(any6, 15001), ap(any6, 15006)}})
	pod.Server(t, "local", ap(any6, 8080), appUID, appUID)
	pod.Net.Server(t, "remote", ap(any6, 80))
	pod.Net.Server(t, "remote", ap(any6, 81))
	r6, r6b, r4 := pod.Net.Addrs6[1], pod.Net.Addrs6[2], pod.Net.Addrs[1]
	x := netip.PrefixFrom(r6, 66).Masked()  // holds Addrs6[1] only
	i := netip.PrefixFrom(r6b, 66).Masked() // holds Addrs6[2] only
	type conn struct {
		uid  uint32
		dst  netip.AddrPort
		src  netip.Addr // bound before connect
		want string     // "proxy:<listener port>" or the server's name
	}
	app, proxy := uint32(appUID), uint32(proxyUID)
	for _, c := range []struct {
		name   string
		args   []string
		mutate func(*policy.Config)
		conns  []conn
	}{
		{name: "default", conns: []conn{
			{app, ap(r6, 80), netip.Addr{}, "proxy:15001"},
			{proxy, ap(r6, 80), netip.Addr{}, "remote"},                    // the proxy's own (uid)
			{app, ap(netip.IPv6Loopback(), 8080), netip.Addr{}, "local"},   // -d ::1 RETURN
			{app, ap(pod.Addr6, 8080), netip.Addr{}, "local"},              // the app to its own pod
			{proxy, ap(pod.Addr6, 8080), netip.Addr{}, "proxy:15006"},      // hairpin
			{proxy, ap(netip.IPv6Loopback(), 8080), netip.Addr{}, "local"}, // no hairpin to ::1
			{proxy, ap(pod.Addr6, 8080), passthrough6, "local"},            // from ::6, not hairpinned
			{app, ap(any6, 8080), netip.Addr{}, "local"},                   // :: is ::1
		}},
		{name: "-o 80", args: []string{"-o", "80"}, conns: []conn{
			{app, ap(r6, 80), netip.Addr{}, "remote"},
			{app, ap(r6, 81), netip.Addr{}, "proxy:15001"},
		}},
		{name: "-x IPv6", mutate: func(c *policy.Config) { c.OutboundExcludeCIDRs = []netip.Prefix{x} }, conns: []conn{
			{app, ap(r6, 80), netip.Addr{}, "remote"},
			{app, ap(r6b, 80), netip.Addr{}, "proxy:15001"},
			{app, ap(r4, 80), netip.Addr{}, "proxy:15001"}, // an IPv6 range leaves IPv4 alone
		}},
		{name: "-i IPv6 only", args: []string{"-i", ""}, mutate: func(c *policy.Config) { c.OutboundCIDRs.Prefixes = []netip.Prefix{i} }, conns: []conn{
			{app, ap(r6b, 80), netip.Addr{}, "proxy:15001"},
			{app, ap(r6, 80), netip.Addr{}, "remote"},
			{app, ap(r4, 80), netip.Addr{}, "remote"}, // no IPv4 range: IPv4 is not captured
		}},
		{name: "-i IPv4 only", args: []string{"-i", "198.19.0.0/16"}, conns: []conn{
			{app, ap(r4, 80), netip.Addr{}, "proxy:15001"},
			{app, ap(r6, 80), netip.Addr{}, "remote"}, // no IPv6 range: IPv6 is not captured
		}},
		{name: "-q 81", args: []string{"-i", "", "-q", "81"}, conns: []conn{
			{app, ap(r6, 81), netip.Addr{}, "proxy:15001"},
			{app, ap(r6, 80), netip.Addr{}, "remote"},
		}},
		{name: "-i ::1 captures loopback", mutate: func(c *policy.Config) {
			c.OutboundCIDRs = policy.CIDRList{Prefixes: []netip.Prefix{netip.MustParsePrefix("::1/128")}}
		}, conns: []conn{
			{app, ap(netip.IPv6Loopback(), 8080), netip.Addr{}, "local"}, // -d ::1 RETURN still wins
			{app, ap(pod.Addr6, 8080), netip.Addr{}, "local"},            // not in -i
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := ipv6Config(t, c.args...)
			if c.mutate != nil {
				c.mutate(cfg)
			}
			divertest.Attach(t, pod, opts, cfg) // the first attaches, the others update
			// One client per uid (a process per dial is slow in the VM guests).
			for _, uid := range []uint32{app, proxy} {
				var conns []conn
				var targets []testpod.Target
				for _, cn := range c.conns {
					if cn.uid == uid {
						conns = append(conns, cn)
						targets = append(targets, testpod.Target{Dst: cn.dst, BindSrc: cn.src})
					}
				}
				if len(targets) == 0 {
					continue
				}
				for k, r := range pod.Dial(t, uid, uid, targets...) {
					cn, target := conns[k], targets[k]
					got := r.Err
					if len(r.Hops) == 1 {
						got = r.Hops[0].Who
						if got == "proxy" {
							lp, _ := netip.ParseAddrPort(r.Hops[0].Listener)
							got = fmt.Sprintf("proxy:%d", lp.Port())
							routed := cn.dst
							if routed.Addr().IsUnspecified() {
								routed = ap(netip.IPv6Loopback(), cn.dst.Port())
							}
							if r.Hops[0].Orig != routed.String() {
								t.Errorf("uid %d -> %v: the proxy read %q (%s), want %s", uid, target, r.Hops[0].Orig, r.Hops[0].OrigErr, routed)
							}
						}
					}
					if got != cn.want {
						t.Errorf("uid %d -> %v: reached %q, want %q (%+v)", uid, target, got, cn.want, r)
					}
				}
			}
		})
	}
}

// Without IPv6 capture (istio writes no ip6tables rules: an IPv4-only pod), native IPv6
// is neither captured nor counted, while IPv4 dialled from the same dual-stack socket type
// is.
func TestIPv6NotCapturedWithoutIt(t *testing.T) {
	pod := testpod.New(t)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	pod.Proxy(t, "proxy", ap(any6, 15001), "report", proxyUID, proxyUID)
	pod.Server(t, "local", ap(netip.IPv6Loopback(), 8080), appUID, appUID)
	res := pod.Dial(t, appUID, appUID,
		testpod.Target{Dst: ap(netip.IPv6Loopback(), 8080)},
		testpod.Target{Dst: ap(netip.IPv6Loopback(), 8080), Shape: testpod.Shape{DualStack: true}},
		testpod.Target{Dst: ap(pod.Net.Addrs[0], 80), Shape: testpod.Shape{DualStack: true}})
	if len(res[0].Hops) != 1 || res[0].Hops[0].Who != "local" || len(res[1].Hops) != 1 || res[1].Hops[0].Who != "local" {
		t.Errorf("IPv6 to [::1]:8080 should reach the local server untouched: %+v", res[:2])
	}
	if len(res[2].Hops) != 1 || res[2].Hops[0].Who != "proxy" {
		t.Errorf("IPv4 from a dual-stack socket should be captured: %+v", res[2])
	}
	for r, n := range att.CountersByFamily(t, maps.IPv6) {
		if n != 0 {
			t.Errorf("IPv6 counter %s = %d, want nothing counted", r, n)
		}
	}
}

// A proxy listening before divert is attached, Envoy's way in dual stack (0.0.0.0:15006
// and an IPv6-only [::]:15006), is found for both families: each listener keeps its slot
// in its family's half of the listener map, so neither can push the other out.
func TestIPv6InboundAdoptsExistingListeners(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: proxyUID, GID: proxyUID,
		Listen: []netip.AddrPort{ap(anyAddr, 15006), ap(any6, 15006)}, V6Only: true})
	divertest.Attach(t, pod, divertest.BPFFS(t), ipv6Config(t))
	for _, dst := range []netip.AddrPort{ap(pod.Addr6, 8080), ap(pod.Addr, 8080)} {
		res := pod.Net.Dial(t, testpod.Target{Dst: dst})[0]
		want := "0.0.0.0:15006"
		if dst.Addr().Is6() {
			want = "[::]:15006"
		}
		if len(res.Hops) != 1 || res.Hops[0].Who != "proxy" || res.Hops[0].Listener != want || res.Hops[0].Orig != dst.String() {
			t.Errorf("remote -> %s: want the proxy's %s listener reading it, got %+v", dst, want, res)
		}
	}
}
