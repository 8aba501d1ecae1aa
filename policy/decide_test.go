package policy_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshdivert/divert/policy"
)

const (
	app   = 1000 // an application's uid and gid
	proxy = 1337 // the default proxy uid and gid
)

var (
	podIP       = netip.MustParseAddr("10.244.0.5") // the pod's own address (local)
	passthrough = policy.InboundPassthroughSource   // 127.0.0.6
	unbound     = netip.Addr{}
)

// out is an outbound connection; local says the destination is an address of the pod.
func out(uid, gid uint32, src netip.Addr, dst string, local bool) policy.Conn {
	return policy.Conn{
		Direction: policy.Outbound, UID: uid, GID: gid, Src: src,
		Dst: netip.MustParseAddrPort(dst), DstLocal: local,
	}
}

// in is an inbound connection to port of the pod.
func in(port uint16) policy.Conn {
	return policy.Conn{
		Direction: policy.Inbound, UID: proxy, GID: proxy,
		Dst: netip.AddrPortFrom(podIP, port), DstLocal: true,
	}
}

func pass(r policy.Reason) policy.Verdict { return policy.Verdict{Action: policy.Pass, Reason: r} }

func toOutbound(port uint16, r policy.Reason) policy.Verdict {
	return policy.Verdict{Action: policy.RedirectOutbound, Reason: r, Port: port}
}

func toInbound(port uint16, r policy.Reason) policy.Verdict {
	return policy.Verdict{Action: policy.RedirectInbound, Reason: r, Port: port}
}

type decideCase struct {
	name string
	args []string // istio-iptables flags on top of the defaults
	conn policy.Conn
	want policy.Verdict
}

// ruleCases has one row per rule of istio's ISTIO_OUTPUT and ISTIO_INBOUND chains, in the
// order the rules appear in /work/shared/reference (flags that add rules noted per row).
var ruleCases = []decideCase{
	// -o P: "-p tcp --dport P -j RETURN", before everything else.
	{"-o excluded port", []string{"-o", "22"}, out(app, app, unbound, "10.96.0.10:22", false),
		pass(policy.ReasonExcludedOutboundPort)},
	// -o lo -s 127.0.0.6/32 -j RETURN
	{"127.0.0.6 to the pod", nil, out(proxy, proxy, passthrough, "10.244.0.5:8080", true),
		pass(policy.ReasonInboundPassthrough)},
	// -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
	{"proxy uid hairpin", nil, out(proxy, proxy, unbound, "10.244.0.5:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	// -o lo -m owner ! --uid-owner 1337 -j RETURN
	{"app to its own pod", nil, out(app, app, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonLocalDestination)},
	// -m owner --uid-owner 1337 -j RETURN
	{"proxy uid to a remote", nil, out(proxy, proxy, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonProxyUID)},
	// -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
	// is shadowed: every local destination was decided by the two -o lo uid rules above.
	{"gid hairpin is shadowed by the uid rules", nil, out(app, proxy, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonLocalDestination)},
	// -o lo -m owner ! --gid-owner 1337 -j RETURN: shadowed the same way.
	{"-o lo ! gid is shadowed by ! uid", nil, out(app, app, unbound, "127.0.0.2:8080", true),
		pass(policy.ReasonLocalDestination)},
	// -m owner --gid-owner 1337 -j RETURN
	{"proxy gid to a remote", nil, out(app, proxy, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonProxyGID)},
	// -d 127.0.0.1/32 -j RETURN. 127.0.0.1 always routes via lo in a real pod, where
	// "-o lo ! --uid-owner" decides first (see "app to 127.0.0.1" below); the rule is only
	// reached by a destination the caller says is not local.
	{"127.0.0.1 not via lo", nil, out(app, app, unbound, "127.0.0.1:8080", false),
		pass(policy.ReasonLocalhost)},
	// -x CIDR: "-d CIDR -j RETURN"
	{"-x excluded CIDR", []string{"-x", "169.254.169.254"}, out(app, app, unbound, "169.254.169.254:80", false),
		pass(policy.ReasonExcludedCIDR)},
	// -q P: "-p tcp --dport P -j ISTIO_REDIRECT"
	{"-q included port", []string{"-i", "", "-q", "3306"}, out(app, app, unbound, "10.96.0.10:3306", false),
		toOutbound(15001, policy.ReasonIncludedOutboundPort)},
	// -i '*': "-j ISTIO_REDIRECT"
	{"-i * captures the rest", nil, out(app, app, unbound, "10.96.0.10:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	// -i CIDR: "-d CIDR -j ISTIO_REDIRECT"
	{"-i CIDR", []string{"-i", "10.96.0.0/12"}, out(app, app, unbound, "10.96.0.10:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	// -i list: nothing else is redirected.
	{"-i list, not listed", []string{"-i", "10.96.0.0/12"}, out(app, app, unbound, "8.8.8.8:443", false),
		pass(policy.ReasonNotIncluded)},

	// ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
	{"inbound tunnel port", nil, in(15008), pass(policy.ReasonInboundTunnelPort)},
	// ISTIO_INBOUND -p tcp --dport 15090/15021/15020 -j RETURN (-d)
	{"inbound excluded 15090", nil, in(15090), pass(policy.ReasonInboundExcludedPort)},
	{"inbound excluded 15021", nil, in(15021), pass(policy.ReasonInboundExcludedPort)},
	{"inbound excluded 15020", nil, in(15020), pass(policy.ReasonInboundExcludedPort)},
	// ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT (-b '*')
	{"inbound captured", nil, in(8080), toInbound(15006, policy.ReasonInboundIncludedPort)},
	// -b list: "--dport P -j ISTIO_IN_REDIRECT" per port, nothing else.
	{"inbound -b list", []string{"-b", "80,8080"}, in(8080), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound -b list, not listed", []string{"-b", "80,8080"}, in(9090), pass(policy.ReasonInboundNotIncluded)},
}

// orderCases prove first-match-wins: each row has two or more rules that match, and the
// earlier one must decide.
var orderCases = []decideCase{
	// -o comes before everything.
	{"-o beats 127.0.0.6 passthrough", []string{"-o", "8080"}, out(proxy, proxy, passthrough, "10.244.0.5:8080", true),
		pass(policy.ReasonExcludedOutboundPort)},
	{"-o beats hairpin", []string{"-o", "8080"}, out(proxy, proxy, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonExcludedOutboundPort)},
	{"-o beats local destination", []string{"-o", "8080"}, out(app, app, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonExcludedOutboundPort)},
	{"-o beats -q", []string{"-o", "3306", "-q", "3306"}, out(app, app, unbound, "10.96.0.10:3306", false),
		pass(policy.ReasonExcludedOutboundPort)},
	{"-o beats -x", []string{"-o", "80", "-x", "10.96.0.0/12"}, out(app, app, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonExcludedOutboundPort)},
	{"-o other port does not match", []string{"-o", "22"}, out(app, app, unbound, "10.96.0.10:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},

	// 127.0.0.6: only to a local destination, and before the uid rules.
	{"127.0.0.6 to 127.0.0.1 by proxy", nil, out(proxy, proxy, passthrough, "127.0.0.1:8080", true),
		pass(policy.ReasonInboundPassthrough)},
	{"127.0.0.6 by app to the pod", nil, out(app, app, passthrough, "10.244.0.5:8080", true),
		pass(policy.ReasonInboundPassthrough)},
	// A loopback source cannot leave the pod: the kernel's route lookup fails the connect
	// (EINVAL) before any rule sees it (test/parity: "bound to 127.0.0.6 to a remote").
	{"127.0.0.6 by app to a remote is the kernel's EINVAL", nil, out(app, app, passthrough, "10.96.0.10:80", false),
		pass(policy.ReasonNone)},
	{"127.0.0.6 by proxy to a remote is the kernel's EINVAL", nil, out(proxy, proxy, passthrough, "10.96.0.10:80", false),
		pass(policy.ReasonNone)},

	// The hairpin: proxy uid, local, not 127.0.0.1, not the tunnel port.
	{"proxy to 127.0.0.1 is not hairpinned", nil, out(proxy, proxy, unbound, "127.0.0.1:8080", true),
		pass(policy.ReasonProxyUID)},
	{"proxy to the tunnel port is not hairpinned", nil, out(proxy, proxy, unbound, "10.244.0.5:15008", true),
		pass(policy.ReasonProxyUID)},
	{"proxy to other 127.x is hairpinned", nil, out(proxy, proxy, unbound, "127.0.0.2:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"proxy uid with another gid is hairpinned", nil, out(proxy, 0, unbound, "10.244.0.5:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"hairpin beats -i nothing", []string{"-i", ""}, out(proxy, proxy, unbound, "10.244.0.5:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"hairpin beats -x", []string{"-x", "10.244.0.0/16"}, out(proxy, proxy, unbound, "10.244.0.5:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"-e moves the tunnel port: 15009 not hairpinned", []string{"-e", "15009"}, out(proxy, proxy, unbound, "10.244.0.5:15009", true),
		pass(policy.ReasonProxyUID)},
	{"-e moves the tunnel port: 15008 hairpinned", []string{"-e", "15009"}, out(proxy, proxy, unbound, "10.244.0.5:15008", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"-u moves the hairpin", []string{"-u", "2000"}, out(2000, 2000, unbound, "10.244.0.5:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"-u: 1337 is an app now", []string{"-u", "2000"}, out(proxy, proxy, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonLocalDestination)},

	// The app and local destinations: "-o lo ! --uid-owner" before everything below it.
	{"app to 127.0.0.1", nil, out(app, app, unbound, "127.0.0.1:8080", true),
		pass(policy.ReasonLocalDestination)},
	{"app to the tunnel port of its pod", nil, out(app, app, unbound, "10.244.0.5:15008", true),
		pass(policy.ReasonLocalDestination)},
	{"local destination beats -q", []string{"-q", "8080"}, out(app, app, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonLocalDestination)},
	{"app with proxy gid to a local dst: uid rule first", nil, out(app, proxy, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonLocalDestination)},
	{"app with proxy gid to 127.0.0.1", nil, out(app, proxy, unbound, "127.0.0.1:8080", true),
		pass(policy.ReasonLocalDestination)},

	// uid, then gid, then 127.0.0.1, then -x, -q, -i.
	{"proxy uid beats -q", []string{"-q", "3306"}, out(proxy, app, unbound, "10.96.0.10:3306", false),
		pass(policy.ReasonProxyUID)},
	{"proxy uid and gid: uid first", nil, out(proxy, proxy, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonProxyUID)},
	{"proxy gid beats -q", []string{"-q", "3306"}, out(app, proxy, unbound, "10.96.0.10:3306", false),
		pass(policy.ReasonProxyGID)},
	{"-g 2000", []string{"-g", "2000"}, out(app, 2000, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonProxyGID)},
	{"-g 2000: gid 1337 is an app", []string{"-g", "2000"}, out(app, proxy, unbound, "10.96.0.10:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-u 2000 alone: gid follows", []string{"-u", "2000"}, out(app, 2000, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonProxyGID)},
	{"proxy gid beats localhost", nil, out(app, proxy, unbound, "127.0.0.1:80", false),
		pass(policy.ReasonProxyGID)},
	{"localhost beats -q", []string{"-q", "3306"}, out(app, app, unbound, "127.0.0.1:3306", false),
		pass(policy.ReasonLocalhost)},
	{"-x CIDR", []string{"-x", "10.96.0.0/12"}, out(app, app, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonExcludedCIDR)},
	{"-x CIDR, outside", []string{"-x", "10.96.0.0/12"}, out(app, app, unbound, "10.112.0.1:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-x beats -q", []string{"-x", "10.96.0.0/12", "-q", "3306"}, out(app, app, unbound, "10.96.0.10:3306", false),
		pass(policy.ReasonExcludedCIDR)},
	{"-x beats -i", []string{"-i", "10.0.0.0/8", "-x", "10.96.0.0/12"}, out(app, app, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonExcludedCIDR)},
	{"-i with -x, outside -x", []string{"-i", "10.0.0.0/8", "-x", "10.96.0.0/12"}, out(app, app, unbound, "10.1.1.1:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-q redirects even with -i nothing", []string{"-i", "", "-q", "3306"}, out(app, app, unbound, "8.8.8.8:3306", false),
		toOutbound(15001, policy.ReasonIncludedOutboundPort)},
	{"-q beats -i *", []string{"-q", "3306"}, out(app, app, unbound, "10.96.0.10:3306", false),
		toOutbound(15001, policy.ReasonIncludedOutboundPort)},
	{"-q, other port with -i nothing", []string{"-i", "", "-q", "3306"}, out(app, app, unbound, "8.8.8.8:80", false),
		pass(policy.ReasonNotIncluded)},
	{"-i nothing captures nothing", []string{"-i", ""}, out(app, app, unbound, "10.96.0.10:80", false),
		pass(policy.ReasonNotIncluded)},
	{"-i list, second CIDR", []string{"-i", "10.96.0.0/12,192.168.0.0/16"}, out(app, app, unbound, "192.168.1.1:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-i bare IP", []string{"-i", "10.96.0.10"}, out(app, app, unbound, "10.96.0.11:80", false),
		pass(policy.ReasonNotIncluded)},
	// Native IPv6 of a pod istio writes no IPv6 rules for (Config.IPv6 false, the default
	// here; ipv6Cases has the rest) is not captured: no rule decides it and no counter counts
	// it. A v4-mapped destination is IPv4 on the wire.
	{"IPv6 destination is not captured by -i *", nil, out(app, app, unbound, "[fd00::1]:80", false),
		pass(policy.ReasonNone)},
	{"IPv6 inbound is not captured", nil, policy.Conn{Direction: policy.Inbound, Dst: netip.MustParseAddrPort("[fd00::5]:8080"), DstLocal: true},
		pass(policy.ReasonNone)},
	{"v4-mapped destination is decided as IPv4", nil, out(app, app, unbound, "[::ffff:10.96.0.10]:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"v4-mapped destination, -x", []string{"-x", "10.96.0.0/12"}, out(app, app, unbound, "[::ffff:10.96.0.10]:80", false),
		pass(policy.ReasonExcludedCIDR)},

	// Custom ports change where redirects land.
	{"-p changes the outbound target", []string{"-p", "15101", "-z", "15106"}, out(app, app, unbound, "10.96.0.10:80", false),
		toOutbound(15101, policy.ReasonIncludedCIDR)},
	{"-z changes the hairpin target", []string{"-p", "15101", "-z", "15106"}, out(proxy, proxy, unbound, "10.244.0.5:8080", true),
		toInbound(15106, policy.ReasonProxyHairpin)},
	{"-z changes the inbound target", []string{"-z", "15106"}, in(8080),
		toInbound(15106, policy.ReasonInboundIncludedPort)},
	{"-p with -q", []string{"-p", "15101", "-i", "", "-q", "3306"}, out(app, app, unbound, "10.96.0.10:3306", false),
		toOutbound(15101, policy.ReasonIncludedOutboundPort)},

	// Inbound.
	{"inbound tunnel port beats -b list", []string{"-b", "8080,15008"}, in(15008), pass(policy.ReasonInboundTunnelPort)},
	{"inbound tunnel port beats -b *", []string{"-b", "*", "-d", ""}, in(15008), pass(policy.ReasonInboundTunnelPort)},
	{"inbound -e moves the tunnel port", []string{"-e", "15009"}, in(15009), pass(policy.ReasonInboundTunnelPort)},
	{"inbound -e: 15008 is captured", []string{"-e", "15009"}, in(15008), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound -d with -b *", []string{"-b", "*", "-d", "9000"}, in(9000), pass(policy.ReasonInboundExcludedPort)},
	{"inbound -d replaces the default list", []string{"-d", "9000"}, in(15090), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound -d ignored with -b list", []string{"-b", "9000,15090", "-d", "9000,15090"}, in(9000),
		toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound default -d ignored with -b list", []string{"-b", "15090"}, in(15090),
		toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound -b nothing", []string{"-b", ""}, in(8080), pass(policy.ReasonInboundNotIncluded)},
	{"inbound -b nothing, tunnel port", []string{"-b", ""}, in(15008), pass(policy.ReasonInboundTunnelPort)},
	{"inbound ignores -o", []string{"-o", "8080"}, in(8080), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound ignores -i nothing", []string{"-i", ""}, in(8080), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound ignores uid", nil, policy.Conn{Direction: policy.Inbound, UID: app, GID: app,
		Dst: netip.MustParseAddrPort("10.244.0.5:8080")}, toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound TPROXY mode lands on the same port", []string{"-m", "TPROXY"}, in(8080),
		toInbound(15006, policy.ReasonInboundIncludedPort)},
	// Found by the iptables backend's kernel tests (the kernel is the oracle):
	// -i naming a loopback range drops istio's "-o lo ! owner -j RETURN" rules.
	{"-i loopback range captures the app's loopback connection", []string{"-i", "127.1.2.0/24"}, out(app, app, unbound, "127.1.2.3:80", true),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-i loopback range makes the gid hairpin reachable", []string{"-i", "127.1.2.0/24"}, out(app, proxy, unbound, "10.244.0.5:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"-i loopback range: app to own pod falls through to not-included", []string{"-i", "127.1.2.0/24"}, out(app, app, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonNotIncluded)},
	// TPROXY mode returns the tunnel port only in a nat chain it does not use.
	{"TPROXY captures the tunnel port inbound", []string{"-m", "TPROXY"}, in(15008), toInbound(15006, policy.ReasonInboundIncludedPort)},
	// The proxy forwarding from the client's address (original_src): TPROXY mode passes it
	// as inbound passthrough (where istio's nat hairpin catches it, docs/semantics.md).
	{"TPROXY: the proxy from a foreign source to the pod passes", []string{"-m", "TPROXY"}, foreign(out(proxy, proxy, clientIP, "10.244.0.5:8080", true)),
		pass(policy.ReasonInboundPassthrough)},
	{"TPROXY: the proxy from a foreign source to 127.0.0.2 passes", []string{"-m", "TPROXY"}, foreign(out(proxy, proxy, clientIP, "127.0.0.2:8080", true)),
		pass(policy.ReasonInboundPassthrough)},
	{"TPROXY: a foreign source to a remote is still the proxy's own", []string{"-m", "TPROXY"}, foreign(out(proxy, proxy, clientIP, "10.0.0.9:80", false)),
		pass(policy.ReasonProxyUID)},
	{"REDIRECT: the proxy from a foreign source to the pod hairpins", nil, foreign(out(proxy, proxy, clientIP, "10.244.0.5:8080", true)),
		toInbound(15006, policy.ReasonProxyHairpin)},
}

var clientIP = netip.MustParseAddr("10.0.0.7") // a client outside the pod

// foreign marks c's bound source as not the pod's (a transparent socket's).
func foreign(c policy.Conn) policy.Conn {
	c.SrcForeign = policy.SrcForeign(c.Src, []netip.Addr{podIP})
	return c
}

func runDecide(t *testing.T, cases []decideCase) {
	t.Helper()
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			cfg := mustParse(t, tt.args...)
			got := cfg.Decide(tt.conn)
			require.Equal(t, tt.want, got, "flags %q, conn %+v: got %s, want %s", tt.args, tt.conn, got, tt.want)
		})
	}
}

func TestDecideRules(t *testing.T) { runDecide(t, ruleCases) }

func TestDecideOrder(t *testing.T) { runDecide(t, orderCases) }

// TestDecideReachesEveryReason checks the tables above exercise every verdict reason.
func TestDecideReachesEveryReason(t *testing.T) {
	seen := map[policy.Reason]bool{}
	for _, tt := range append(append(append(append([]decideCase{}, ruleCases...), orderCases...), dnsCases...), settingsCases...) {
		seen[tt.want.Reason] = true
	}
	for _, r := range policy.Reasons() {
		if r == policy.ReasonNone {
			continue
		}
		require.True(t, seen[r], "no Decide case ends in reason %s", r)
	}
}

// TestDecideVerdictShape checks every verdict's Port agrees with its Action, for a spread
// of connections over a few configs.
func TestDecideVerdictShape(t *testing.T) {
	configs := [][]string{nil, {"-p", "15101", "-z", "15106", "-i", "", "-q", "80", "-b", "80"}}
	conns := []policy.Conn{}
	for _, tt := range append(append([]decideCase{}, ruleCases...), orderCases...) {
		conns = append(conns, tt.conn)
	}
	for _, args := range configs {
		cfg := mustParse(t, args...)
		for _, conn := range conns {
			v := cfg.Decide(conn)
			if a := conn.Dst.Addr(); a.Is6() && !a.Is4In6() {
				require.Equal(t, pass(policy.ReasonNone), v, "native IPv6 is not captured without IPv6 rules: %+v", conn)
				continue
			}
			if conn.Refused() != policy.NotRefused {
				require.Equal(t, pass(policy.ReasonNone), v, "the kernel refuses it: %+v", conn)
				continue
			}
			require.NotEqual(t, policy.ReasonNone, v.Reason, "%+v", conn)
			switch v.Action {
			case policy.Pass:
				require.Zero(t, v.Port)
			case policy.RedirectOutbound:
				require.Equal(t, cfg.ProxyPort, v.Port)
			case policy.RedirectInbound:
				require.Equal(t, cfg.InboundCapturePort, v.Port)
			}
		}
	}
}

func TestReasons(t *testing.T) {
	rs := policy.Reasons()
	require.Len(t, rs, int(policy.NumReasons))
	names := map[string]policy.Reason{}
	for i, r := range rs {
		require.Equal(t, policy.Reason(i), r, "Reasons() must be in counter order")
		s := r.String()
		require.NotEmpty(t, s, "reason %d", i)
		require.NotContains(t, s, "reason(", "reason %d has no name", i)
		require.NotContains(t, s, " ", "reason %d", i)
		if prev, dup := names[s]; dup {
			t.Fatalf("reasons %d and %d are both %q", prev, r, s)
		}
		names[s] = r
	}
	require.Equal(t, "reason(200)", policy.Reason(200).String())
}

func TestActionAndVerdictStrings(t *testing.T) {
	require.Equal(t, "pass", policy.Pass.String())
	require.Equal(t, "redirect-outbound", policy.RedirectOutbound.String())
	require.Equal(t, "redirect-inbound", policy.RedirectInbound.String())
	require.Equal(t, "pass (localhost)", pass(policy.ReasonLocalhost).String())
	v := toOutbound(15001, policy.ReasonIncludedCIDR).String()
	require.True(t, strings.Contains(v, "15001") && strings.Contains(v, "included-cidr"), v)
}

// TestRefused: the connections that fail in the kernel whatever the rules; Decide leaves
// them to it whatever the policy.
func TestRefused(t *testing.T) {
	loopback := netip.MustParseAddr("127.0.0.1")
	boundLo := func(c policy.Conn) policy.Conn { c.BoundLo, c.BoundDevice = true, true; return c }
	boundEth0 := func(c policy.Conn) policy.Conn { c.BoundDevice = true; return c }
	loopback6 := netip.MustParseAddr("::1")
	for _, tt := range []struct {
		conn policy.Conn
		want policy.Refusal
	}{
		{out(app, app, unbound, "255.255.255.255:80", false), policy.Unreachable},
		{out(app, app, unbound, "224.0.0.1:80", false), policy.Unreachable},
		{out(app, app, unbound, "239.255.255.250:1900", false), policy.Unreachable},
		{out(proxy, proxy, unbound, "127.255.255.255:8080", true), policy.Unreachable},
		{out(app, app, unbound, "[::ffff:255.255.255.255]:80", false), policy.Unreachable},
		{out(app, app, loopback, "10.96.0.10:80", false), policy.Invalid},
		{boundLo(out(proxy, proxy, unbound, "10.96.0.10:80", false)), policy.Unanswered},
		{boundLo(out(app, app, unbound, "10.244.0.5:8080", true)), policy.Unanswered},
		{boundLo(out(app, app, unbound, "127.0.0.2:8080", true)), policy.NotRefused},
		{out(app, app, unbound, "0.1.2.3:80", false), policy.NotRefused}, // unicast since Linux 5.3
		{out(app, app, unbound, "0.0.0.0:80", false), policy.NotRefused}, // the host itself
		{out(app, app, loopback, "0.0.0.0:80", false), policy.NotRefused},
		{out(app, app, loopback, "10.244.0.5:80", true), policy.NotRefused},
		{out(app, app, unbound, "127.255.255.254:80", true), policy.NotRefused},
		{out(app, app, unbound, "240.0.0.1:80", false), policy.NotRefused},
		{udp(out(app, app, unbound, "255.255.255.255:53", false)), policy.NotRefused}, // TCP only
		{policy.Conn{Direction: policy.Inbound, Dst: netip.MustParseAddrPort("224.0.0.1:80")}, policy.NotRefused},
		// Native IPv6 (test/parity's edgeScenarios6 show ip6tables' kernel doing so).
		{out(app, app, unbound, "[ff02::1]:80", false), policy.Unreachable},
		{out(proxy, proxy, unbound, "[ff0e::1]:1900", false), policy.Unreachable},
		{boundLo(out(app, app, unbound, "[ff02::1]:80", false)), policy.Unreachable},
		{out(app, app, unbound, "[fe80::1]:80", false), policy.NeedsInterface},
		{boundEth0(out(app, app, unbound, "[fe80::1]:80", false)), policy.NotRefused},
		{boundLo(out(app, app, unbound, "[fe80::1]:80", false)), policy.NoRouteFromLo},
		{boundLo(out(app, app, unbound, "[fd00::5]:80", false)), policy.NoRouteFromLo},
		{boundLo(out(app, app, unbound, "[fd00::2]:8080", true)), policy.NoRouteFromLo},
		{boundLo(out(app, app, unbound, "[::1]:8080", true)), policy.NotRefused},
		{boundLo(out(app, app, unbound, "[::]:8080", true)), policy.NotRefused}, // ::1
		{out(app, app, loopback6, "[fd00::5]:80", false), policy.NotRefused},
		{out(app, app, unbound, "[fd00::5]:80", false), policy.NotRefused},
		{udp(out(app, app, unbound, "[ff02::1]:53", false)), policy.NotRefused},
	} {
		require.Equal(t, tt.want, tt.conn.Refused(), "%+v", tt.conn)
		if tt.want != policy.NotRefused {
			for _, args := range [][]string{nil, {"-i", "127.0.0.0/8"}, {"-q", "80,8080,1900"}} {
				cfg := mustParse(t, args...)
				require.Equal(t, pass(policy.ReasonNone), cfg.Decide(tt.conn), "%q %+v", args, tt.conn)
			}
		}
	}
}
