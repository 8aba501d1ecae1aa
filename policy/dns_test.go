package policy_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshdivert/divert/policy"
)

var (
	dnsOn  = []string{"--redirect-dns", "--dns-servers", "10.96.0.10,10.96.0.11"}
	dnsAll = []string{"--redirect-dns", "--capture-all-dns"}
)

func udp(c policy.Conn) policy.Conn { c.Proto = policy.UDP; return c }

func with(base []string, more ...string) []string {
	return append(append([]string{}, base...), more...)
}

var toAgent = policy.Verdict{Action: policy.RedirectDNS, Reason: policy.ReasonDNSCaptured, Port: policy.DNSAgentPort}

// dnsCases follow /work/shared/reference/dns.rules and dns-capture-all.rules rule by rule:
// ISTIO_OUTPUT_DNS sits after the uid and gid rules, before 127.0.0.1, -x, -q and -i; -o
// (tcp and udp) comes before everything; with DNS on, port 53 is carved out of the uid
// hairpin and of the "local destination" returns (not of the gid hairpin).
var dnsCases = []decideCase{
	{"UDP query to the nameserver goes to the agent", dnsOn, udp(out(app, app, unbound, "10.96.0.10:53", false)), toAgent},
	{"TCP query to the nameserver goes to the agent", dnsOn, out(app, app, unbound, "10.96.0.10:53", false), toAgent},
	{"the second nameserver too", dnsOn, udp(out(app, app, unbound, "10.96.0.11:53", false)), toAgent},
	{"v4-mapped UDP query to the nameserver", dnsOn, udp(out(app, app, unbound, "[::ffff:10.96.0.10]:53", false)), toAgent},
	{"UDP to port 53 of another address passes", dnsOn, udp(out(app, app, unbound, "8.8.8.8:53", false)), pass(policy.ReasonDNSNotCaptured)},
	{"TCP to port 53 of another address follows the TCP rules", dnsOn, out(app, app, unbound, "8.8.8.8:53", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"UDP to another port of the nameserver is not decided", dnsOn, udp(out(app, app, unbound, "10.96.0.10:5353", false)), pass(policy.ReasonNone)},
	{"the proxy uid's queries pass", dnsOn, udp(out(proxy, proxy, unbound, "10.96.0.10:53", false)), pass(policy.ReasonProxyUID)},
	{"the proxy uid's TCP queries pass", dnsOn, out(proxy, proxy, unbound, "10.96.0.10:53", false), pass(policy.ReasonProxyUID)},
	{"the proxy gid's queries pass", dnsOn, udp(out(app, proxy, unbound, "10.96.0.10:53", false)), pass(policy.ReasonProxyGID)},
	{"-o 53 disables DNS capture (UDP)", with(dnsOn, "-o", "53"), udp(out(app, app, unbound, "10.96.0.10:53", false)),
		pass(policy.ReasonExcludedOutboundPort)},
	{"-o 53 disables DNS capture (TCP)", with(dnsOn, "-o", "53"), out(app, app, unbound, "10.96.0.10:53", false),
		pass(policy.ReasonExcludedOutboundPort)},
	{"-i '' leaves DNS capture on", with(dnsOn, "-i", ""), udp(out(app, app, unbound, "10.96.0.10:53", false)), toAgent},
	{"DNS capture comes before -x", with(dnsOn, "-x", "10.96.0.0/12"), out(app, app, unbound, "10.96.0.10:53", false), toAgent},
	{"-x passes UDP to another address's port 53", with(dnsOn, "-x", "8.8.8.0/24"), udp(out(app, app, unbound, "8.8.8.8:53", false)),
		pass(policy.ReasonExcludedCIDR)},
	{"capture-all takes any destination's port 53", dnsAll, udp(out(app, app, unbound, "8.8.8.8:53", false)), toAgent},
	{"capture-all takes TCP too", dnsAll, out(app, app, unbound, "8.8.8.8:53", false), toAgent},
	{"capture-all comes before 127.0.0.1", dnsAll, udp(out(app, app, unbound, "127.0.0.1:53", true)), toAgent},
	{"by nameserver, 127.0.0.1:53 passes", dnsOn, udp(out(app, app, unbound, "127.0.0.1:53", true)), pass(policy.ReasonLocalhost)},
	{"capture-all: the pod's own port 53 too", dnsAll, out(app, app, unbound, "10.244.0.5:53", true), toAgent},
	{"a nameserver on the pod's own address is captured", with(nil, "--redirect-dns", "--dns-servers", "10.244.0.5"),
		udp(out(app, app, unbound, "10.244.0.5:53", true)), toAgent},
	{"bound to 127.0.0.6 to the pod passes before DNS", dnsAll, udp(out(app, app, passthrough, "10.244.0.5:53", true)),
		pass(policy.ReasonInboundPassthrough)},
	// Port 53 left out of "-o lo -p tcp ! --dport 53 ... -j RETURN": the app's TCP to its own
	// port 53 falls through to -i and is captured for the proxy, as under istio's rules.
	{"with DNS on, the app's TCP to its own port 53 is captured", dnsOn, out(app, app, unbound, "10.244.0.5:53", true),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"with DNS off, the app's TCP to its own port 53 passes", nil, out(app, app, unbound, "10.244.0.5:53", true),
		pass(policy.ReasonLocalDestination)},
	{"with DNS on, the proxy's TCP to its own port 53 is not hairpinned", dnsOn, out(proxy, proxy, unbound, "10.244.0.5:53", true),
		pass(policy.ReasonProxyUID)},
	{"with DNS off, the proxy's TCP to its own port 53 hairpins", nil, out(proxy, proxy, unbound, "10.244.0.5:53", true),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"with DNS on, the proxy gid's TCP to its own port 53 hairpins (istio's gid rule keeps 53)", dnsOn,
		out(app, proxy, unbound, "10.244.0.5:53", true), toInbound(15006, policy.ReasonProxyHairpin)},
	{"DNS off: UDP to the nameserver is not decided", nil, udp(out(app, app, unbound, "10.96.0.10:53", false)), pass(policy.ReasonNone)},
	{"DNS off: TCP to the nameserver follows the TCP rules", nil, out(app, app, unbound, "10.96.0.10:53", false),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"--capture-all-dns alone does nothing, as in istio-iptables", []string{"--capture-all-dns"},
		udp(out(app, app, unbound, "8.8.8.8:53", false)), pass(policy.ReasonNone)},
	{"inbound UDP is never captured", dnsAll, udp(in(53)), pass(policy.ReasonNone)},
}

func TestDecideDNS(t *testing.T) { runDecide(t, dnsCases) }

func writeResolvConf(t *testing.T, content string) string {
	path := filepath.Join(t.TempDir(), "resolv.conf")
	require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
	return path
}

func TestDNSFlags(t *testing.T) {
	ns := func(ss ...string) []netip.Addr {
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out
	}
	conf := writeResolvConf(t, "# generated\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10 ; kube-dns\n"+
		"options ndots:5\nnameserver\t10.96.0.11\n")
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want policy.Config
	}{
		{"bare --redirect-dns reads resolv.conf", []string{"--redirect-dns", "--resolv-conf", conf}, nil,
			policy.Config{RedirectDNS: true, DNSServers: ns("10.96.0.10", "10.96.0.11")}},
		{"$ISTIO_META_DNS_CAPTURE", []string{"--resolv-conf", conf}, map[string]string{"ISTIO_META_DNS_CAPTURE": "true"},
			policy.Config{RedirectDNS: true, DNSServers: ns("10.96.0.10", "10.96.0.11")}},
		{"$REDIRECT_DNS", []string{"--resolv-conf", conf}, map[string]string{"REDIRECT_DNS": "true"},
			policy.Config{RedirectDNS: true, DNSServers: ns("10.96.0.10", "10.96.0.11")}},
		{"$ISTIO_META_DNS_CAPTURE overrides $REDIRECT_DNS", nil, map[string]string{"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false"},
			policy.Config{}},
		{"the flag overrides the environment", []string{"--redirect-dns=false"}, map[string]string{"ISTIO_META_DNS_CAPTURE": "true"},
			policy.Config{}},
		{"capture-all reads no resolv.conf", []string{"--redirect-dns", "--resolv-conf", "/nonexistent"}, map[string]string{"CAPTURE_ALL_DNS": "true"},
			policy.Config{RedirectDNS: true, CaptureAllDNS: true}},
		{"--dns-servers instead of resolv.conf", []string{"--redirect-dns", "--dns-servers", "10.0.0.10", "--resolv-conf", "/nonexistent"}, nil,
			policy.Config{RedirectDNS: true, DNSServers: ns("10.0.0.10")}},
		{"off reads no resolv.conf", []string{"--resolv-conf", "/nonexistent"}, nil, policy.Config{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parse(tt.args, tt.env)
			require.NoError(t, err)
			want := policy.Default()
			want.RedirectDNS, want.CaptureAllDNS, want.DNSServers = tt.want.RedirectDNS, tt.want.CaptureAllDNS, tt.want.DNSServers
			require.Equal(t, want, got)
		})
	}
}

// TestDNSFlagsErrors: bad input gets one line naming the setting and the fix.
func TestDNSFlagsErrors(t *testing.T) {
	empty := writeResolvConf(t, "search cluster.local\noptions ndots:5\n")
	notIP := writeResolvConf(t, "nameserver kube-dns\n")
	for _, tt := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--redirect-dns", "--resolv-conf", "/nonexistent/resolv.conf"}, nil,
			`invalid --resolv-conf "/nonexistent/resolv.conf" for --redirect-dns: no such file or directory; pass the pod's resolv.conf with --resolv-conf, its nameservers with --dns-servers, or use --capture-all-dns`},
		{[]string{"--redirect-dns", "--resolv-conf", empty}, nil, `it lists no nameserver; pass the pod's resolv.conf`},
		{[]string{"--redirect-dns", "--resolv-conf", notIP}, nil, `line 1: nameserver "kube-dns" is not an IP address`},
		{[]string{"--redirect-dns", "--dns-servers", "10.96.0.300"}, nil, `invalid --dns-servers "10.96.0.300": "10.96.0.300" is not an IP address`},
		{[]string{"--redirect-dns", "--dns-servers", ""}, nil, `invalid --redirect-dns: no nameserver to capture; list the pod's with --dns-servers, or use --capture-all-dns`},
		{[]string{"--dns-servers", "10.96.0.10"}, nil,
			`invalid --dns-servers "10.96.0.10": nameservers are used only with --redirect-dns; add --redirect-dns (or $ISTIO_META_DNS_CAPTURE=true), or drop --dns-servers`},
		{[]string{"--redirect-dns=false", "--dns-servers", "10.96.0.10"}, map[string]string{"ISTIO_META_DNS_CAPTURE": "true"},
			`invalid --dns-servers "10.96.0.10": nameservers are used only with --redirect-dns`},
		{[]string{"--redirect-dns=yes please"}, nil, `invalid --redirect-dns "yes please": use true or false`},
		{nil, map[string]string{"ISTIO_META_DNS_CAPTURE": "on"}, `invalid --redirect-dns (from $ISTIO_META_DNS_CAPTURE) "on": use true or false`},
	} {
		_, err := parse(tt.args, tt.env)
		require.Error(t, err, "%q %v", tt.args, tt.env)
		require.Contains(t, err.Error(), tt.want)
		require.NotContains(t, err.Error(), "\n")
	}
}

func TestParseResolvConf(t *testing.T) {
	got, err := policy.ParseResolvConf([]byte("nameserver 10.0.0.1\n#nameserver 10.0.0.9\nnameserver fe80::1%eth0\nnameserver ::ffff:10.0.0.2\n"))
	require.NoError(t, err)
	require.Equal(t, []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fe80::1"), netip.MustParseAddr("10.0.0.2")}, got)
}

func TestDNSArgsRoundTrip(t *testing.T) {
	for _, args := range [][]string{dnsOn, dnsAll, with(dnsOn, "-o", "53")} {
		cfg := mustParse(t, args...)
		again, err := parse(cfg.Args(), map[string]string{"ISTIO_META_DNS_CAPTURE": "false", "CAPTURE_ALL_DNS": "true"})
		require.NoError(t, err, "Args() = %q", cfg.Args())
		require.Equal(t, cfg, again, "Args() = %q", cfg.Args())
	}
}
