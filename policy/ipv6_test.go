package policy_test

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshdivert/divert/policy"
)

var (
	podIP6       = netip.MustParseAddr("fd00::5") // the pod's own IPv6 address (local)
	passthrough6 = policy.InboundPassthroughSource6
	dnsOn6       = []string{"--redirect-dns", "--dns-servers", "10.96.0.10,fd00:10:96::a"}
)

func in6(port uint16) policy.Conn {
	c := in(port)
	c.Dst = netip.AddrPortFrom(podIP6, port)
	return c
}

// ipv6Cases follow the IPv6 part (ip6tables-restore input) of /work/shared/reference's
// ipv6.rules, dual-stack.rules and dual-stack-dns-exclusions.rules rule by rule, for a pod
// whose IPv6 rules istio writes (Config.IPv6): the IPv4 rules with ::6 and ::1, and each
// family's own -i, -x and nameservers.
var ipv6Cases = []decideCase{
	{"-o first", []string{"-o", "3306"}, out(proxy, proxy, unbound, "[fd00::5]:3306", true), pass(policy.ReasonExcludedOutboundPort)},
	{"::6 to the pod passes", nil, out(proxy, proxy, passthrough6, "[fd00::5]:8080", true), pass(policy.ReasonInboundPassthrough)},
	{"::6 to ::1 passes", nil, out(proxy, proxy, passthrough6, "[::1]:8080", true), pass(policy.ReasonInboundPassthrough)},
	{"127.0.0.6 is no IPv6 passthrough", nil, out(proxy, proxy, passthrough, "[fd00::5]:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"::6 to a remote address is decided on", nil, out(app, app, passthrough6, "[fd00:1::1]:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"proxy to its pod's IPv6 address hairpins", nil, out(proxy, proxy, unbound, "[fd00::5]:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"proxy to ::1 does not hairpin", nil, out(proxy, proxy, unbound, "[::1]:8080", true), pass(policy.ReasonProxyUID)},
	{"proxy tunnel port does not hairpin", nil, out(proxy, proxy, unbound, "[fd00::5]:15008", true), pass(policy.ReasonProxyUID)},
	{"app to its pod's IPv6 address", nil, out(app, app, unbound, "[fd00::5]:8080", true), pass(policy.ReasonLocalDestination)},
	{"app to ::1", nil, out(app, app, unbound, "[::1]:8080", true), pass(policy.ReasonLocalDestination)},
	{"proxy uid to a remote IPv6 address", nil, out(proxy, proxy, unbound, "[2001:db8::1]:443", false), pass(policy.ReasonProxyUID)},
	{"proxy gid hairpin", nil, out(app, proxy, unbound, "[fd00::5]:8080", true), pass(policy.ReasonLocalDestination)},
	{"proxy gid to a remote IPv6 address", nil, out(app, proxy, unbound, "[2001:db8::1]:443", false), pass(policy.ReasonProxyGID)},
	{"-i * captures IPv6", nil, out(app, app, unbound, "[2001:db8::1]:443", false), toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-x IPv6 range", []string{"-x", "10.0.0.0/8,fd00:10::/64"}, out(app, app, unbound, "[fd00:10::7]:80", false),
		pass(policy.ReasonExcludedCIDR)},
	{"-x IPv6 range leaves IPv4 alone", []string{"-x", "fd00:10::/64"}, out(app, app, unbound, "10.0.0.7:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-x IPv4 range leaves IPv6 alone", []string{"-x", "10.0.0.0/8"}, out(app, app, unbound, "[fd00:10::7]:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-i IPv4 only captures no IPv6", []string{"-i", "10.0.0.0/8"}, out(app, app, unbound, "[fd00:10::7]:80", false),
		pass(policy.ReasonNotIncluded)},
	{"-i IPv6 only captures no IPv4", []string{"-i", "fd00:10::/64"}, out(app, app, unbound, "10.0.0.7:80", false),
		pass(policy.ReasonNotIncluded)},
	{"-i mixed, the IPv6 range", []string{"-i", "10.0.0.0/8,fd00:10::/64"}, out(app, app, unbound, "[fd00:10::7]:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-i mixed, outside both", []string{"-i", "10.0.0.0/8,fd00:10::/64"}, out(app, app, unbound, "[fd00:11::7]:80", false),
		pass(policy.ReasonNotIncluded)},
	{"-i bare IPv6 address", []string{"-i", "fd00:10::7"}, out(app, app, unbound, "[fd00:10::7]:80", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-q captures IPv6 too", []string{"-i", "", "-q", "3306"}, out(app, app, unbound, "[fd00:10::7]:3306", false),
		toOutbound(15001, policy.ReasonIncludedOutboundPort)},
	{"-x beats -q in IPv6", []string{"-x", "fd00:10::/64", "-q", "3306"}, out(app, app, unbound, "[fd00:10::7]:3306", false),
		pass(policy.ReasonExcludedCIDR)},
	// istio drops the local-destination returns of both families when -i names a loopback
	// range of either; ::1 still passes by "-d ::1/128 -j RETURN", before -i.
	{"-i ::1 drops the local returns", []string{"-i", "::1/128"}, out(app, app, unbound, "[fd00::5]:8080", true), pass(policy.ReasonNotIncluded)},
	{"-i ::1 still returns ::1", []string{"-i", "::1/128"}, out(app, app, unbound, "[::1]:8080", true), pass(policy.ReasonLocalhost)},
	{"-i 127.0.0.0/8 drops the IPv6 local returns too", []string{"-i", "127.0.0.0/8"}, out(app, proxy, unbound, "[fd00::5]:8080", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	// connect() to :: reaches ::1, whatever the socket is bound to.
	{"app to [::] is ::1", nil, out(app, app, unbound, "[::]:8080", false), pass(policy.ReasonLocalDestination)},
	{"proxy to [::] bound to the pod's address is ::1", nil, out(proxy, proxy, podIP6, "[::]:8080", false), pass(policy.ReasonProxyUID)},

	// Inbound: the same ports decide.
	{"inbound IPv6 captured", nil, in6(8080), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"inbound IPv6 tunnel port", nil, in6(15008), pass(policy.ReasonInboundTunnelPort)},
	{"inbound IPv6 -d", nil, in6(15090), pass(policy.ReasonInboundExcludedPort)},
	{"inbound IPv6 -b list", []string{"-b", "9000"}, in6(8080), pass(policy.ReasonInboundNotIncluded)},

	// DNS (dual-stack-dns-exclusions.rules): each family captures its own nameservers.
	{"UDP query to the IPv6 nameserver", dnsOn6, udp(out(app, app, unbound, "[fd00:10:96::a]:53", false)), toAgent},
	{"TCP query to the IPv6 nameserver", dnsOn6, out(app, app, unbound, "[fd00:10:96::a]:53", false), toAgent},
	{"UDP query to another IPv6 address", dnsOn6, udp(out(app, app, unbound, "[fd00:10:96::b]:53", false)), pass(policy.ReasonDNSNotCaptured)},
	{"IPv4 nameserver only: IPv6 query not captured", dnsOn, udp(out(app, app, unbound, "[fd00:10:96::a]:53", false)), pass(policy.ReasonDNSNotCaptured)},
	{"IPv4 nameserver only: TCP query on the pod's IPv6 address skips the local return", dnsOn, out(app, app, unbound, "[fd00::5]:53", true),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"capture all DNS captures IPv6", dnsAll, udp(out(app, app, unbound, "[2001:db8::53]:53", false)), toAgent},
	{"the proxy's own IPv6 query passes", dnsOn6, udp(out(proxy, proxy, unbound, "[fd00:10:96::a]:53", false)), pass(policy.ReasonProxyUID)},
}

func TestDecideIPv6(t *testing.T) {
	for _, tt := range ipv6Cases {
		t.Run(tt.name, func(t *testing.T) {
			cfg := mustParse(t, tt.args...)
			cfg.IPv6 = true
			got := cfg.Decide(tt.conn)
			require.Equal(t, tt.want, got, "flags %q, conn %+v: got %s, want %s", tt.args, tt.conn, got, tt.want)

			// Where istio writes no IPv6 rules, no native IPv6 connection is decided.
			cfg.IPv6 = false
			if d := tt.conn.Routed().Dst.Addr(); !d.Is4In6() && d.Is6() {
				require.Equal(t, pass(policy.ReasonNone), cfg.Decide(tt.conn))
			}
		})
	}
}

// The IPv6 rules mirror the IPv4 ones: every IPv4 rule case, moved to IPv6 addresses, ends
// the same way.
func TestDecideIPv6MirrorsIPv4(t *testing.T) {
	to6 := func(a netip.Addr) netip.Addr {
		switch {
		case !a.IsValid():
			return a
		case a == policy.Localhost:
			return policy.Localhost6
		case a == policy.InboundPassthroughSource:
			return policy.InboundPassthroughSource6
		case a.Is4():
			b := a.As4()
			return netip.AddrFrom16([16]byte{0: 0xfd, 12: b[0], 13: b[1], 14: b[2], 15: b[3]})
		}
		return a
	}
	n := 0
	for _, tt := range append(append([]decideCase{}, ruleCases...), orderCases...) {
		d := tt.conn.Dst.Addr()
		// Only cases without a v4 CIDR flag, and no other 127/8 address (IPv6 has one).
		// Nor what the kernel refuses for IPv4 only (::6 is no loopback source).
		if tt.args != nil || !d.Is4() || (d.IsLoopback() && d != policy.Localhost) || d.IsUnspecified() || tt.conn.Refused() != policy.NotRefused {
			continue
		}
		conn := tt.conn
		conn.Dst = netip.AddrPortFrom(to6(d), conn.Dst.Port())
		conn.Src = to6(conn.Src)
		cfg := mustParse(t)
		cfg.IPv6 = true
		require.Equal(t, cfg.Decide(tt.conn), cfg.Decide(conn), "%s, as IPv6: %+v", tt.name, conn)
		n++
	}
	require.Greater(t, n, 10)
}

// istio decides IPv6 from the pod's addresses (getLocalIP): the kernel lists IPv4 first, so
// without dual stack any IPv4 address makes the pod IPv4, whatever the order given.
func TestPodIPv6(t *testing.T) {
	addrs := func(ss ...string) []netip.Addr {
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out
	}
	for _, tt := range []struct {
		addrs           []netip.Addr
		single, dual    bool
		whatTheCaseSays string
	}{
		{addrs("10.244.0.5"), false, false, "IPv4 pod"},
		{addrs("fd00::5"), true, true, "IPv6 pod"},
		{addrs("fd00::5", "10.244.0.5"), false, true, "dual stack, IPv6 listed first: IPv4 without dual stack"},
		{addrs("10.244.0.5", "fd00::5"), false, true, "dual stack"},
		{addrs("127.0.0.1", "::1", "fe80::1", "fd00::5"), true, true, "loopback and link-local do not count"},
		{addrs("127.0.0.1", "::1", "fe80::1", "10.244.0.5"), false, false, "loopback and link-local IPv6 do not count"},
		{addrs("169.254.1.1", "fd00::5"), true, true, "IPv4 link-local does not count"},
		{addrs("::ffff:10.244.0.5", "fd00::5"), false, true, "v4-mapped is IPv4"},
		{addrs("::6", "10.244.0.5"), false, true, "::6 on lo counts as IPv6"},
		{nil, false, false, "no address"},
	} {
		require.Equal(t, tt.single, policy.PodIPv6(tt.addrs, false), tt.whatTheCaseSays)
		require.Equal(t, tt.dual, policy.PodIPv6(tt.addrs, true), tt.whatTheCaseSays+", dual stack")
		cfg := policy.Default()
		cfg.DecideIPv6(tt.addrs)
		require.Equal(t, tt.single, cfg.IPv6)
		cfg.DualStack = true
		cfg.DecideIPv6(tt.addrs)
		require.Equal(t, tt.dual, cfg.IPv6)
		require.Equal(t, tt.dual, slicesContains(cfg.Families(), policy.IPv6))
	}
}

func slicesContains(fs []policy.Family, f policy.Family) bool {
	for _, x := range fs {
		if x == f {
			return true
		}
	}
	return false
}

// --dual-stack is read as istio-iptables reads it: $DUAL_STACK, then $ISTIO_DUAL_STACK
// overriding it, then the flag; $ISTIO_AGENT_DUAL_STACK (its pre-1.18 name) is not read.
func TestDualStackSetting(t *testing.T) {
	for _, tt := range []struct {
		args []string
		env  map[string]string
		want bool
	}{
		{nil, nil, false},
		{[]string{"--dual-stack"}, nil, true},
		{[]string{"--dual-stack=false"}, map[string]string{"ISTIO_DUAL_STACK": "true"}, false},
		{nil, map[string]string{"DUAL_STACK": "true"}, true},
		{nil, map[string]string{"ISTIO_DUAL_STACK": "true"}, true},
		{nil, map[string]string{"DUAL_STACK": "true", "ISTIO_DUAL_STACK": "false"}, false},
		{nil, map[string]string{"ISTIO_AGENT_DUAL_STACK": "true"}, false},
	} {
		cfg, err := parse(tt.args, tt.env)
		require.NoError(t, err)
		require.Equal(t, tt.want, cfg.DualStack, "%q %v", tt.args, tt.env)
		require.False(t, cfg.IPv6, "parsing alone decides no family: the pod's addresses do")
	}
}

// -i and -x take both families in one list; each family's rules get their own.
func TestFlagsMixedFamilies(t *testing.T) {
	cfg := mustParse(t, "-i", "10.0.0.0/8, fd00:10::/64,2001:db8::1", "-x", "fd00:10:96::/112,10.96.0.0/12")
	require.Equal(t, prefixes("10.0.0.0/8"), cfg.OutboundCIDRsOf(policy.IPv4))
	require.Equal(t, prefixes("fd00:10::/64", "2001:db8::1/128"), cfg.OutboundCIDRsOf(policy.IPv6))
	require.Equal(t, prefixes("10.96.0.0/12"), cfg.OutboundExcludeCIDRsOf(policy.IPv4))
	require.Equal(t, prefixes("fd00:10:96::/112"), cfg.OutboundExcludeCIDRsOf(policy.IPv6))
	require.Equal(t, prefixes("fd00:10::/64", "2001:db8::1/128"), cfg.IPv6OutboundCIDRs())
	// A host part beyond the mask is masked, as iptables does.
	cfg = mustParse(t, "-x", "fd00:10::1/64")
	require.Equal(t, prefixes("fd00:10::/64"), cfg.OutboundExcludeCIDRs)

	cfg = mustParse(t, dnsOn6...)
	require.Equal(t, []netip.Addr{netip.MustParseAddr("10.96.0.10")}, cfg.DNSServersOf(policy.IPv4))
	require.Equal(t, []netip.Addr{netip.MustParseAddr("fd00:10:96::a")}, cfg.DNSServersOf(policy.IPv6))
	require.True(t, cfg.CapturesDNSOf(policy.IPv4))
	require.True(t, cfg.CapturesDNSOf(policy.IPv6))
	cfg = mustParse(t, dnsOn...)
	require.False(t, cfg.CapturesDNSOf(policy.IPv6), "no IPv6 nameserver: no IPv6 DNS rules")
	cfg = mustParse(t, dnsAll...)
	require.True(t, cfg.CapturesDNSOf(policy.IPv6))
}

// An IPv6 nameserver in resolv.conf is captured by the IPv6 rules.
func TestResolvConfIPv6(t *testing.T) {
	v6 := writeResolvConf(t, "nameserver fd00:10:96::a\nnameserver 10.96.0.10\n")
	cfg := mustParse(t, "--redirect-dns", "--resolv-conf", v6)
	require.Equal(t, []netip.Addr{netip.MustParseAddr("fd00:10:96::a"), netip.MustParseAddr("10.96.0.10")}, cfg.DNSServers)
}
