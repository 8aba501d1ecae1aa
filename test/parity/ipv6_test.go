package parity

import (
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"testing"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/test/testpod"
)

// newWorld6 is newWorld for a pod of the given stack: the proxy listens on 0.0.0.0 and, for
// IPv6, on [::] (IPV6_V6ONLY, beside 0.0.0.0, as Envoy's additional addresses in dual
// stack); the app and remote servers listen on dual-stack [::] sockets, so they answer
// both families. ::6 is on lo, as istio-init leaves it for IPv6 pods whatever captures
// them, so the proxy's (and the app's) bind to it works in every backend.
func newWorld6(t *testing.T, stack testpod.Stack) *world {
	pod := testpod.NewStack(t, stack)
	w := &world{pod: pod, cidrA6: pod.Net.Addrs6[1], cidrB6: pod.Net.Addrs6[2]}
	if pod.Addr.IsValid() {
		w.cidrA, w.cidrB = pod.Net.Addrs[1], pod.Net.Addrs[2]
	}
	if out, err := nsexec.CombinedOutput(pod.NetNSPath, exec.Command("ip", "-6", "addr", "add", "::6/128", "dev", "lo")); err != nil {
		t.Fatalf("add ::6 to lo: %v %s", err, out)
	}
	pod.Sysctl(t, "net/ipv4/tcp_fastopen", "1027") // as newWorld: it covers IPv6 too
	any4, any6 := netip.IPv4Unspecified(), netip.IPv6Unspecified()
	var listen []netip.AddrPort
	for _, p := range proxyPorts {
		listen = append(listen, netip.AddrPortFrom(any4, p), netip.AddrPortFrom(any6, p))
	}
	w.procs = append(w.procs,
		pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Listen: listen, V6Only: true, Mode: "report", UID: proxyUID, GID: proxyUID, Transparent: true}),
		pod.Server(t, "app", netip.AddrPortFrom(any6, 8080), appUID, appUID),
		pod.Server(t, "app", netip.AddrPortFrom(any6, 9090), appUID, appUID),
		pod.Server(t, "metrics", netip.AddrPortFrom(any6, 15090), proxyUID, proxyUID),
		pod.Server(t, "tunnel", netip.AddrPortFrom(any6, 15008), proxyUID, proxyUID),
		pod.Net.Server(t, "remote", netip.AddrPortFrom(any6, 80)),
		pod.Net.Server(t, "remote", netip.AddrPortFrom(any6, 81)))
	return w
}

// ipv6Scenarios are every outbound rule of istio's ip6tables rules, in IPv6: the IPv4
// table's rows with ::6, ::1, the pod's IPv6 address and IPv6 ranges, from Go's IPv6
// sockets and from dual-stack ones.
var ipv6Scenarios = []scenario6{
	{scenario: scenario{name: "app to remote is captured", uid: appUID, gid: appUID, dst: "remote6:80"}},
	{scenario: scenario{name: "excluded outbound port passes", flags: []string{"-o", "80"}, uid: appUID, gid: appUID, dst: "remote6:80"}},
	{scenario: scenario{name: "excluded outbound port beats the hairpin", flags: []string{"-o", "8080"}, uid: proxyUID, gid: proxyUID, dst: "pod6:8080"}},
	{scenario: scenario{name: "proxy bound to ::6 to the pod passes", uid: proxyUID, gid: proxyUID, src: "::6", dst: "pod6:8080"}},
	{scenario: scenario{name: "app bound to ::6 to the pod passes", uid: appUID, gid: appUID, src: "::6", dst: "pod6:8080"}},
	{scenario: scenario{name: "proxy bound to ::6 to ::1 passes", uid: proxyUID, gid: proxyUID, src: "::6", dst: "[::1]:8080"}},
	{scenario: scenario{name: "proxy to own pod IP hairpins to inbound port", uid: proxyUID, gid: proxyUID, dst: "pod6:8080"}},
	{scenario: scenario{name: "proxy to ::1 passes", uid: proxyUID, gid: proxyUID, dst: "[::1]:8080"}},
	{scenario: scenario{name: "proxy to own pod tunnel port passes", uid: proxyUID, gid: proxyUID, dst: "pod6:15008"}},
	{scenario: scenario{name: "proxy to remote passes", uid: proxyUID, gid: proxyUID, dst: "remote6:80"}},
	{scenario: scenario{name: "app to own pod IP passes", uid: appUID, gid: appUID, dst: "pod6:8080"}},
	{scenario: scenario{name: "app to ::1 passes", uid: appUID, gid: appUID, dst: "[::1]:8080"}},
	// connect() to :: reaches ::1, whatever the socket is bound to.
	{scenario: scenario{name: "app to :: passes", uid: appUID, gid: appUID, dst: "[::]:8080"}},
	{scenario: scenario{name: "proxy to :: passes", uid: proxyUID, gid: proxyUID, dst: "[::]:8080"}},
	{scenario: scenario{name: "app bound to the pod IP to :: reaches ::1", uid: appUID, gid: appUID, src: "{pod6}", dst: "[::]:8080"}},
	{scenario: scenario{name: "proxy gid alone to remote passes", uid: appUID, gid: proxyUID, dst: "remote6:80"}},
	{scenario: scenario{name: "proxy gid alone to own pod passes", uid: appUID, gid: proxyUID, dst: "pod6:8080"}},
	{scenario: scenario{name: "-g differs from -u: that gid passes", flags: []string{"-g", "2000"}, uid: appUID, gid: 2000, dst: "remote6:80"}},
	{scenario: scenario{name: "-u 2000: uid 1337 is captured", flags: []string{"-u", "2000"}, uid: proxyUID, gid: proxyUID, dst: "remote6:80"}},
	{scenario: scenario{name: "excluded CIDR passes", flags: []string{"-x", "{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA6:80"}},
	{scenario: scenario{name: "outside the excluded CIDR is captured", flags: []string{"-x", "{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrB6:80"}},
	{scenario: scenario{name: "included CIDR is captured", flags: []string{"-i", "{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA6:80"}},
	{scenario: scenario{name: "outside the included CIDRs passes", flags: []string{"-i", "{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrB6:80"}},
	{scenario: scenario{name: "two included CIDRs", flags: []string{"-i", "{cidrA6}/66,{cidrB6}/128"}, uid: appUID, gid: appUID, dst: "cidrB6:80"}},
	{scenario: scenario{name: "-x narrows a wider -i", flags: []string{"-i", "fd00:19::/32", "-x", "{cidrA6}/128"}, uid: appUID, gid: appUID, dst: "cidrA6:80"}},
	{scenario: scenario{name: "empty -i captures nothing", flags: []string{"-i", ""}, uid: appUID, gid: appUID, dst: "remote6:80"}},
	{scenario: scenario{name: "-q captures its port with empty -i", flags: []string{"-i", "", "-q", "81"}, uid: appUID, gid: appUID, dst: "remote6:81"}},
	{scenario: scenario{name: "-x beats -q", flags: []string{"-i", "", "-q", "80", "-x", "{cidrA6}/128"}, uid: appUID, gid: appUID, dst: "cidrA6:80"}},
	{scenario: scenario{name: "custom -p", flags: []string{"-p", "16001", "-z", "16006"}, uid: appUID, gid: appUID, dst: "remote6:80"}},
	{scenario: scenario{name: "custom -z for the hairpin", flags: []string{"-p", "16001", "-z", "16006"}, uid: proxyUID, gid: proxyUID, dst: "pod6:8080"}},
	{scenario: scenario{name: "custom -e: 15008 now hairpins", flags: []string{"-e", "15009"}, uid: proxyUID, gid: proxyUID, dst: "pod6:15008"}},
	{scenario: scenario{name: "-i ::1 drops the local returns", flags: []string{"-i", "::1/128"}, uid: appUID, gid: proxyUID, dst: "pod6:8080"}},
	{scenario: scenario{name: "-i ::1: ::1 still passes", flags: []string{"-i", "::1/128"}, uid: appUID, gid: appUID, dst: "[::1]:8080"}},
	{scenario: scenario{name: "TPROXY mode: app to remote is captured", flags: []string{"-m", "TPROXY"}, uid: appUID, gid: appUID, dst: "remote6:80"}},
	{scenario: scenario{name: "TPROXY mode: hairpin", flags: []string{"-m", "TPROXY"}, uid: proxyUID, gid: proxyUID, dst: "pod6:8080"}},
	{scenario: scenario{name: "TPROXY mode: passthrough", flags: []string{"-m", "TPROXY"}, uid: proxyUID, gid: proxyUID, src: "::6", dst: "pod6:8080"}},
	{scenario: scenario{name: "dual-stack socket: app to remote is captured", uid: appUID, gid: appUID, dst: "remote6:80", dual: true}},
	{scenario: scenario{name: "dual-stack socket: proxy to remote passes", uid: proxyUID, gid: proxyUID, dst: "remote6:80", dual: true}},
	{scenario: scenario{name: "dual-stack socket: excluded CIDR passes", flags: []string{"-x", "{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA6:80", dual: true}},
	{scenario: scenario{name: "dual-stack socket: proxy to own pod IP hairpins", uid: proxyUID, gid: proxyUID, dst: "pod6:8080", dual: true}},
	{scenario: scenario{name: "dual-stack socket: proxy bound to ::6 passes", uid: proxyUID, gid: proxyUID, src: "::6", dst: "pod6:8080", dual: true}},
	{scenario: scenario{name: "dual-stack socket: app to ::1 passes", uid: appUID, gid: appUID, dst: "[::1]:8080", dual: true}},
	{scenario: scenario{name: "MPTCP socket: app to remote is captured", uid: appUID, gid: appUID, dst: "remote6:80", mptcp: true}},
	{scenario: scenario{name: "MPTCP socket: proxy to own pod IP hairpins", uid: proxyUID, gid: proxyUID, dst: "pod6:8080", mptcp: true}},
	{scenario: scenario{name: "nothing listening: the proxy still answers", uid: appUID, gid: appUID, dst: "remote6:9"}},
	{scenario: scenario{name: "nothing listening and not captured: refused", flags: []string{"-o", "9"}, uid: appUID, gid: appUID, dst: "remote6:9"}},

	// Both families under one config: mixed lists, and the same dual-stack socket type
	// dialling IPv4 (v4-mapped) and IPv6.
	{scenario: scenario{name: "mixed -i: the IPv6 range", flags: []string{"-i", "{cidrA}/26,{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA6:80"}, needs4: true},
	{scenario: scenario{name: "mixed -i: the IPv4 range", flags: []string{"-i", "{cidrA}/26,{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA:80"}, needs4: true},
	{scenario: scenario{name: "mixed -i: outside both", flags: []string{"-i", "{cidrA}/26,{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrB6:80"}, needs4: true},
	{scenario: scenario{name: "-i IPv4 only captures no IPv6", flags: []string{"-i", "{cidrA}/26"}, uid: appUID, gid: appUID, dst: "cidrA6:80"}, needs4: true},
	{scenario: scenario{name: "-i IPv6 only captures no IPv4", flags: []string{"-i", "{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA:80"}, needs4: true},
	{scenario: scenario{name: "mixed -x: the IPv4 range passes", flags: []string{"-x", "{cidrA}/26,{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA:80"}, needs4: true},
	{scenario: scenario{name: "mixed -x: the IPv6 range passes", flags: []string{"-x", "{cidrA}/26,{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA6:80", dual: true}, needs4: true},
	{scenario: scenario{name: "-x IPv4 only: IPv6 is captured", flags: []string{"-x", "{cidrA}/26"}, uid: appUID, gid: appUID, dst: "cidrA6:80"}, needs4: true},
	{scenario: scenario{name: "dual-stack socket: app to IPv4 remote is captured", uid: appUID, gid: appUID, dst: "remote:80", dual: true}, needs4: true},
	{scenario: scenario{name: "dual-stack socket: proxy to own IPv4 pod IP hairpins", uid: proxyUID, gid: proxyUID, dst: "pod:8080", dual: true}, needs4: true},
	{scenario: scenario{name: "dual-stack socket: mixed -x, IPv4 range passes", flags: []string{"-x", "{cidrA}/26,{cidrA6}/66"}, uid: appUID, gid: appUID, dst: "cidrA:80", dual: true}, needs4: true},
	{scenario: scenario{name: "IPv4 app to remote is still captured", uid: appUID, gid: appUID, dst: "remote:80"}, needs4: true},
	{scenario: scenario{name: "IPv4 proxy bound to 127.0.0.6 to the pod passes", uid: proxyUID, gid: proxyUID, src: "127.0.0.6", dst: "pod:8080"}, needs4: true},
}

// scenario6 is an IPv6 row; needs4 rows dial IPv4 too (mixed lists, v4-mapped): only the
// dual-stack pods run them.
type scenario6 struct {
	scenario
	needs4 bool
}

// ipv6Worlds are the pods the IPv6 rows run in, with the flags every row gets there:
// a dual-stack pod with --dual-stack ($ISTIO_DUAL_STACK), an IPv6-only pod (istio captures
// its IPv6 without the flag), and a dual-stack pod without it, where istio writes IPv4
// rules only and every native IPv6 row passes uncaptured (the model's ReasonNone).
var ipv6Worlds = []struct {
	name  string
	stack testpod.Stack
	flags []string
	ipv6  bool // IPv6 captured
}{
	{"dual-stack pod, --dual-stack", testpod.DualStack, []string{"--dual-stack"}, true},
	{"IPv6-only pod", testpod.IPv6Only, nil, true},
	{"dual-stack pod without --dual-stack", testpod.DualStack, nil, false},
}

func TestOutboundParityIPv6(t *testing.T) { outboundParity6(t, ipv6Scenarios, false) }

// outboundParity6 runs rows in every IPv6 world (those that capture IPv6 if captured)
// through every backend.
func outboundParity6(t *testing.T, rows []scenario6, captured bool) {
	for _, pw := range ipv6Worlds {
		if captured && !pw.ipv6 {
			continue
		}
		t.Run(pw.name, func(t *testing.T) {
			for _, b := range backends() {
				t.Run(b.name, func(t *testing.T) {
					w := newWorld6(t, pw.stack)
					b.setup(t, w)
					for _, row := range rows {
						if row.needs4 && !w.pod.Addr.IsValid() {
							continue // an IPv6-only pod has no IPv4 route out
						}
						s := row.scenario
						s.flags = append(append([]string{}, pw.flags...), s.flags...)
						if cfg := w.config(t, s); cfg.IPv6 != pw.ipv6 {
							t.Fatalf("IPv6 capture %v for pod %v with %q, want %v", cfg.IPv6, w.pod.Addrs(), s.flags, pw.ipv6)
						}
						outboundRow(t, w, b, s)
					}
				})
			}
		})
	}
}

// Inbound in IPv6: a client in the remote netns connects to the pod's IPv6 address.
var inboundScenarios6 = []scenario{
	{name: "inbound to the app is captured", dst: "pod6:8080"},
	{name: "inbound to the tunnel port passes", dst: "pod6:15008"},
	{name: "inbound to an excluded port (-d default) passes", dst: "pod6:15090"},
	{name: "inbound to a port nobody listens on is captured", dst: "pod6:7777"},
	{name: "-b list captures a listed port", flags: []string{"-b", "8080"}, dst: "pod6:8080"},
	{name: "-b list leaves other ports alone", flags: []string{"-b", "8080"}, dst: "pod6:9090"},
	{name: "-d excludes with -b *", flags: []string{"-d", "8080"}, dst: "pod6:8080"},
	{name: "empty -b captures nothing", flags: []string{"-b", ""}, dst: "pod6:8080"},
	{name: "custom -z", flags: []string{"-p", "16001", "-z", "16006"}, dst: "pod6:8080"},
	{name: "the proxy's own outbound port is captured inbound", dst: "pod6:15001"},
	{name: "uncaptured inbound straight to a proxy listener reads its own address", flags: []string{"-b", ""}, dst: "pod6:15001"},
	{name: "TPROXY mode: inbound to the app is captured", flags: []string{"-m", "TPROXY"}, dst: "pod6:8080"},
	{name: "TPROXY mode: -d excludes", flags: []string{"-m", "TPROXY"}, dst: "pod6:15090"},
}

func TestInboundParityIPv6(t *testing.T) {
	for _, pw := range ipv6Worlds {
		t.Run(pw.name, func(t *testing.T) {
			for _, b := range backends() {
				t.Run(b.name, func(t *testing.T) {
					w := newWorld6(t, pw.stack)
					b.setup(t, w)
					scenarios := make([]scenario, len(inboundScenarios6))
					for i, s := range inboundScenarios6 {
						s.flags = append(append([]string{}, pw.flags...), s.flags...)
						scenarios[i] = s
					}
					inboundRows(t, w, b, scenarios)
				})
			}
		})
	}
}

// Pools of the IPv6 random parity: the IPv4 ones and their IPv6 counterparts.
var (
	cidrPool6 = append(append([]string{}, cidrPool...), "{cidrA6}/66", "{cidrB6}/128", "fd00:19::/32", "fd00:18::/32", "::1/128", "fd00::/8")
	dstPool6  = append(append([]string{}, dstPool...), "remote6:80", "remote6:81", "cidrA6:80", "cidrB6:80", "pod6:8080",
		"pod6:15008", "[::1]:8080", "[::]:8080", "remote6:9")
)

// TestRandomParityIPv6 is TestRandomParity over both families: a dual-stack pod, random
// configs with mixed -i/-x lists and --dual-stack three times in four (else istio writes
// no IPv6 rules for it), connections of either family from every socket type.
func TestRandomParityIPv6(t *testing.T) {
	randomParity(t, "TestRandomParityIPv6", backends(), func(t *testing.T) *world {
		return newWorld6(t, testpod.DualStack)
	}, func(r *rand.Rand) []string {
		f := randomFlags(r, cidrPool6)
		if r.IntN(4) != 0 {
			f = append(f, "--dual-stack")
		}
		return f
	}, []string{"pod", "pod6"}, dstPool6)
}
