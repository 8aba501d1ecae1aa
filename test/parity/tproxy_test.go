package parity

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
	"github.com/meshdivert/divert/test/testutil"
)

// TPROXY mode end to end: the proxy forwards each inbound connection to the app from the
// client's own address, as Envoy's original_src does (IP_TRANSPARENT, SO_MARK 1337, any
// source port). A row checks who accepted, the original destination the proxy read, and the
// address the app saw its peer at: the client's, the point of TPROXY mode.

type tproxyScenario struct {
	name  string
	flags []string // on top of -m TPROXY
	dst   string   // "pod:8080"
	src   string   // the client's source: "remote" (its primary address) or "cidrA"
	// dual: the proxy forwards from a dual-stack AF_INET6 socket (::ffff:<client> to
	// ::ffff:<pod>), IPv4 on the wire.
	dual bool
	// stack is the pod's families (IPv4 only by default); with IPv6 captured (--dual-stack,
	// or an IPv6-only pod) its IPv6 clients are forwarded from their address too.
	stack testpod.Stack
	// istio: the row runs under istio's own rules too. There every forwarded connection
	// hangs until the proxy gives up (ClientTimeout/2, 5 s in the vmtests guests), so one
	// such row shows it and the others run without the nat hairpin and under eBPF.
	istio bool
}

var tproxyScenarios = []tproxyScenario{
	{name: "the app sees the client's address", dst: "pod:8080", src: "remote", istio: true},
	{name: "the app sees a second client address", dst: "pod:8080", src: "cidrA"},
	{name: "-b list: a listed port", flags: []string{"-b", "9090"}, dst: "pod:9090", src: "remote"},
	{name: "-b list: another port reaches the app directly", flags: []string{"-b", "9090"}, dst: "pod:8080", src: "remote", istio: true},
	{name: "-d: an excluded port reaches its server directly", dst: "pod:15090", src: "remote", istio: true},
	{name: "custom -t and -r", flags: []string{"-t", "1400", "-r", "140"}, dst: "pod:8080", src: "remote"},
	{name: "the proxy forwards from a dual-stack socket", dst: "pod:8080", src: "remote", dual: true},
	// Under istio's ip6tables rules the client's IPv6 connection times out before the
	// proxy's forwarded one gives up (not the IPv4 row's upstream timeout): not a row there.
	{name: "IPv6: the app sees the client's address", flags: []string{"--dual-stack"}, dst: "pod6:8080", src: "remote6", stack: testpod.DualStack},
	{name: "IPv6: the app sees a second client address", flags: []string{"--dual-stack"}, dst: "pod6:8080", src: "cidrA6", stack: testpod.DualStack},
	{name: "IPv6: an IPv4 client beside", flags: []string{"--dual-stack"}, dst: "pod:8080", src: "remote", stack: testpod.DualStack},
	{name: "IPv6: -d: an excluded port reaches its server directly", flags: []string{"--dual-stack"}, dst: "pod6:15090", src: "remote6", stack: testpod.DualStack},
	{name: "IPv6-only pod: the app sees the client's address", dst: "pod6:8080", src: "remote6", stack: testpod.IPv6Only},
}

// tproxyOutcome is what the client's two hops show.
type tproxyOutcome struct {
	outcome
	AppSaw string // the app's peer address (no port), "" when the app was not reached
	Err    string // the proxy's upstream error
}

func (o tproxyOutcome) String() string {
	s := o.outcome.String()
	if o.AppSaw != "" {
		s += ", the app saw " + o.AppSaw
	}
	if o.Err != "" {
		s += ", upstream error: " + o.Err
	}
	return s
}

// tproxyBackend is a backend with what it does to the proxy's original_src connection:
// whether it reaches the app, and if not, the error the proxy gets.
type tproxyBackend struct {
	backend
	upstreamErr string // "" when it reaches the app
}

// istioHairpin is what istio's rules do to the proxy's connection from the client's
// address: the nat ISTIO_OUTPUT hairpin (uid 1337, -o lo, ! -d 127.0.0.1) redirects it to
// 127.0.0.1:15006 and it stays in SYN-SENT (docs/semantics.md, "TPROXY mode").
const istioHairpin = "timeout"

func tproxyBackends() []tproxyBackend {
	var bs []tproxyBackend
	for _, f := range []iptables.Backend{iptables.BackendNFT, iptables.BackendLegacy} {
		bs = append(bs, tproxyBackend{iptablesBackend(f), istioHairpin})
	}
	// The same rules without the two nat hairpin rules: the mangle rules (CONNMARK restore,
	// the policy route) bring the app's replies back, so the hairpin alone breaks it.
	nohp := iptablesBackend(iptables.BackendNFT)
	apply := nohp.apply
	nohp.name += "-without-nat-hairpin"
	nohp.apply = func(t *testing.T, w *world, cfg *policy.Config) {
		apply(t, w, cfg)
		deleteNATHairpin(t, w, cfg)
	}
	return append(bs, tproxyBackend{nohp, ""}, tproxyBackend{ebpfBackend(), ""})
}

// deleteNATHairpin removes istio's uid and gid hairpin rules from nat ISTIO_OUTPUT, and
// from ip6tables' too when it wrote IPv6 rules.
func deleteNATHairpin(t *testing.T, w *world, cfg *policy.Config) {
	tables := []struct{ cmd, localhost string }{{"iptables-nft", "127.0.0.1/32"}}
	if cfg.IPv6 {
		tables = append(tables, struct{ cmd, localhost string }{"ip6tables-nft", "::1/128"})
	}
	for _, tb := range tables {
		for _, owner := range []string{fmt.Sprint("--uid-owner ", cfg.ProxyUID), fmt.Sprint("--gid-owner ", cfg.ProxyGID)} {
			rule := fmt.Sprintf("ISTIO_OUTPUT -o lo ! -d %s -p tcp ! --dport %d -m owner %s -j ISTIO_IN_REDIRECT", tb.localhost, cfg.InboundTunnelPort, owner)
			cmd := exec.Command(tb.cmd, append([]string{"-t", "nat", "-D"}, strings.Fields(rule)...)...)
			if out, err := nsexec.CombinedOutput(w.pod.NetNSPath, cmd); err != nil {
				t.Fatalf("%s -t nat -D %s: %v: %s", tb.cmd, rule, err, out)
			}
		}
	}
}

func newTProxyWorld(t *testing.T, mark uint32, dual bool, stack testpod.Stack) *world {
	pod := testpod.NewStack(t, stack)
	w := &world{pod: pod}
	if pod.Addr.IsValid() {
		w.cidrA, w.cidrB = pod.Net.Addrs[1], pod.Net.Addrs[2]
	}
	any := netip.IPv4Unspecified()
	listen := []netip.AddrPort{netip.AddrPortFrom(any, 15001), netip.AddrPortFrom(any, 15006)}
	if stack != testpod.IPv4Only {
		// The proxy as Envoy listens in dual stack: [::] beside 0.0.0.0 (IPV6_V6ONLY); the
		// servers on dual-stack [::] sockets answer both families.
		w.cidrA6, w.cidrB6 = pod.Net.Addrs6[1], pod.Net.Addrs6[2]
		any6 := netip.IPv6Unspecified()
		listen = append(listen, netip.AddrPortFrom(any6, 15001), netip.AddrPortFrom(any6, 15006))
		any = any6
	}
	w.procs = append(w.procs,
		pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "forward", UID: proxyUID, GID: proxyUID, Transparent: true,
			Listen: listen, V6Only: stack != testpod.IPv4Only, OriginalSrcMark: mark, OriginalSrcDualStack: dual}),
		pod.Server(t, "app", netip.AddrPortFrom(any, 8080), appUID, appUID),
		pod.Server(t, "app", netip.AddrPortFrom(any, 9090), appUID, appUID),
		pod.Server(t, "metrics", netip.AddrPortFrom(any, 15090), proxyUID, proxyUID))
	return w
}

func TestTProxyParity(t *testing.T) {
	// The worlds are made from a row for its backend's test: a skip there would be a
	// FailNow on a parent, so skip here.
	testutil.RequirePrivileged(t)
	for _, b := range tproxyBackends() {
		t.Run(b.name, func(t *testing.T) {
			// The proxy's mark is the pod's -t: one world per mark (and kind of proxy
			// socket), made for the first row that needs it and kept for the backend's rows.
			type proxyKind struct {
				mark  uint32
				dual  bool
				stack testpod.Stack
			}
			worlds := map[proxyKind]*world{}
			bt := t
			for _, s := range tproxyScenarios {
				if b.upstreamErr != "" && !s.istio {
					continue
				}
				t.Run(s.name, func(t *testing.T) {
					cfg := divertest.Config(t, append([]string{"-m", "TPROXY"}, s.flags...)...)
					kind := proxyKind{cfg.TProxyMark, s.dual, s.stack}
					w := worlds[kind]
					if w == nil {
						w = newTProxyWorld(bt, kind.mark, kind.dual, kind.stack)
						worlds[kind] = w
						b.setup(bt, w)
					}
					cfg.DecideIPv6(w.pod.Addrs())
					tproxyRow(t, w, b, s, cfg)
				})
			}
		})
	}
}

func tproxyRow(t *testing.T, w *world, b tproxyBackend, s tproxyScenario, cfg *policy.Config) {
	client := w.resolve(t, s.src+":0").Addr()
	c := policy.Conn{Direction: policy.Inbound, Dst: w.resolve(t, s.dst), DstLocal: true}
	v := cfg.Decide(c)
	want := tproxyOutcome{outcome: w.expected(v, c)}
	// The proxy's connection to the app, from the client's address: the model decides it
	// as an outbound connection of the proxy's.
	up := policy.Conn{UID: proxyUID, GID: proxyUID, Src: client, Dst: c.Dst, DstLocal: true,
		SrcForeign: policy.SrcForeign(client, w.pod.Addrs())}
	upV := cfg.Decide(up)
	switch {
	case v.Action == policy.Pass:
		want.AppSaw = client.String() // reached directly: TPROXY or not, no NAT
	case b.upstreamErr != "":
		want.Err = b.upstreamErr
	case upV.Action == policy.Pass:
		want.AppSaw = client.String()
	default:
		t.Fatalf("the model captures the proxy's original_src connection (%s): no row expects that", upV)
	}
	b.apply(t, w, cfg)
	r := w.pod.Net.Dial(t, testpod.Target{Dst: c.Dst, BindSrc: client})[0]
	got := tproxyObserved(t, r, client)
	if got != want {
		t.Errorf("%s: %s -> %s\n  model (%s; upstream %s): %s\n  %s: %s\n  (%s)", s.name, client, c.Dst, v, upV, want, b.name, got, w.health())
	}
	if w.verdicts == nil { // not the eBPF backend
		return
	}
	// eBPF decides the two connections the model decided: the client's (sk_lookup) and,
	// when it was captured, the proxy's upstream one (connect4); nothing else.
	decisions := decisionsOf(v)
	if v.Action != policy.Pass {
		decisions = append(decisions, decisionsOf(upV)...)
	}
	w.verdicts.Check(t, decisions, b.name)
	w.ebpf.NoDrops(t)
}

// tproxyObserved reads the client's hops: the proxy's (who accepted, the original
// destination, its upstream error) and the app's (its peer), directly or behind the proxy.
// The proxy's upstream must come from the client's address and the app see exactly that
// socket (any port: Envoy's original_src does not keep the client's).
func tproxyObserved(t *testing.T, r testpod.Result, client netip.Addr) tproxyOutcome {
	o := tproxyOutcome{outcome: observed(r)}
	var app *testpod.Hop
	for i, h := range r.Hops {
		switch h.Who {
		case "proxy":
			o.Err = h.Err
			if up, err := netip.ParseAddrPort(h.UpstreamSrc); h.UpstreamSrc != "" && (err != nil || up.Addr().Unmap() != client) {
				t.Errorf("the proxy's upstream came from %s, not the client's address %s", h.UpstreamSrc, client)
			}
		case "app", "metrics":
			app = &r.Hops[i]
		}
	}
	if app == nil {
		return o
	}
	peer, err := netip.ParseAddrPort(app.Peer)
	if err != nil {
		t.Fatalf("app's peer %q: %v", app.Peer, err)
	}
	o.AppSaw = peer.Addr().String()
	if len(r.Hops) > 1 && r.Hops[0].UpstreamSrc != app.Peer {
		t.Errorf("the app's peer %s is not the proxy's upstream socket %s", app.Peer, r.Hops[0].UpstreamSrc)
	}
	return o
}
