package policy_test

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshdivert/divert/policy"
)

// via is conn arriving on, or routed out through, iface.
func via(iface string, c policy.Conn) policy.Conn { c.Iface = iface; return c }

// inTo is an inbound connection to dst (a -k interface's traffic goes anywhere).
func inTo(dst string) policy.Conn {
	return policy.Conn{Direction: policy.Inbound, Dst: netip.MustParseAddrPort(dst)}
}

var (
	groupsOnly    = []string{"--istio-outbound-owner-groups", "1000,2000"}
	groupsExclude = []string{"--istio-outbound-owner-groups-exclude", "3000"}
)

// settingsCases follow istio's rules for owner groups (owner-groups-*.rules: one rule after
// the proxy gid's RETURN), -c (exclude-interfaces.rules: RETURN first in nat PREROUTING
// and OUTPUT) and -k (its golden files: inserted at the top of nat PREROUTING).
var settingsCases = []decideCase{
	// Owner groups: "-m owner ! --gid-owner 1000 -m owner ! --gid-owner 2000 -j RETURN".
	{"listed group is captured", groupsOnly, out(4000, 2000, unbound, "10.0.0.1:80", false), toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"unlisted group passes", groupsOnly, out(4000, 4000, unbound, "10.0.0.1:80", false), pass(policy.ReasonOwnerGroupNotIncluded)},
	{"the uid's number does not count, only the group's", groupsOnly, out(1000, 4000, unbound, "10.0.0.1:80", false), pass(policy.ReasonOwnerGroupNotIncluded)},
	{"the proxy's rules come first", groupsOnly, out(proxy, proxy, unbound, "10.0.0.1:80", false), pass(policy.ReasonProxyUID)},
	{"local destinations are decided first", groupsOnly, out(4000, 4000, unbound, "10.244.0.5:8080", true), pass(policy.ReasonLocalDestination)},
	{"-o is decided first", append([]string{"-o", "80"}, groupsOnly...), out(4000, 4000, unbound, "10.0.0.1:80", false), pass(policy.ReasonExcludedOutboundPort)},
	{"an unlisted group's DNS query is not captured", append([]string{"--redirect-dns", "--capture-all-dns"}, groupsOnly...),
		udp(out(4000, 4000, unbound, "10.96.0.10:53", false)), pass(policy.ReasonOwnerGroupNotIncluded)},
	{"a listed group's DNS query is captured", append([]string{"--redirect-dns", "--capture-all-dns"}, groupsOnly...),
		udp(out(4000, 1000, unbound, "10.96.0.10:53", false)), policy.Verdict{Action: policy.RedirectDNS, Reason: policy.ReasonDNSCaptured, Port: policy.DNSAgentPort}},
	{"an empty list captures no group", []string{"--istio-outbound-owner-groups", ""}, out(app, app, unbound, "10.0.0.1:80", false), pass(policy.ReasonOwnerGroupNotIncluded)},
	// "-m owner --gid-owner 3000 -j RETURN".
	{"excluded group passes", groupsExclude, out(app, 3000, unbound, "10.0.0.1:80", false), pass(policy.ReasonOwnerGroupExcluded)},
	{"other groups are captured", groupsExclude, out(3000, app, unbound, "10.0.0.1:80", false), toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"the exclude list only applies with *", append(append([]string{}, groupsOnly...), groupsExclude...),
		out(app, 3000, unbound, "10.0.0.1:80", false), pass(policy.ReasonOwnerGroupNotIncluded)},

	// -c: "-A PREROUTING -i net1 -j RETURN", "-A OUTPUT -o net1 -j RETURN", first.
	{"outbound through an excluded interface passes", []string{"-c", "net1"}, via("net1", out(app, app, unbound, "10.0.0.1:80", false)),
		pass(policy.ReasonExcludedInterface)},
	{"outbound through another interface is captured", []string{"-c", "net1"}, via("eth0", out(app, app, unbound, "10.0.0.1:80", false)),
		toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"-c beats the hairpin when it names lo", []string{"-c", "lo"}, out(proxy, proxy, unbound, "10.244.0.5:8080", true),
		pass(policy.ReasonExcludedInterface)},
	{"a local destination leaves through lo, whatever Iface says", []string{"-c", "net1"}, via("net1", out(proxy, proxy, unbound, "10.244.0.5:8080", true)),
		toInbound(15006, policy.ReasonProxyHairpin)},
	{"a DNS query through an excluded interface passes", []string{"-c", "net1", "--redirect-dns", "--capture-all-dns"},
		udp(via("net1", out(app, app, unbound, "10.96.0.10:53", false))), pass(policy.ReasonExcludedInterface)},
	{"inbound on an excluded interface passes", []string{"-c", "net1"}, via("net1", in(8080)), pass(policy.ReasonExcludedInterface)},
	{"inbound on another interface is captured", []string{"-c", "net1"}, via("eth0", in(8080)), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"-c beats the tunnel port", []string{"-c", "net1"}, via("net1", in(15008)), pass(policy.ReasonExcludedInterface)},

	// -k: "-I PREROUTING 1 -i eth1 [-d <-i>] -j ISTIO_REDIRECT" above "-I PREROUTING 1 -i eth1 -j RETURN".
	{"a VM's TCP is captured as outbound", []string{"-k", "eth1"}, via("eth1", inTo("10.0.0.1:80")), toOutbound(15001, policy.ReasonVirtualInterface)},
	{"a VM's TCP to the pod itself too", []string{"-k", "eth1"}, via("eth1", in(8080)), toOutbound(15001, policy.ReasonVirtualInterface)},
	{"a VM's TCP outside -i passes", []string{"-k", "eth1", "-i", "10.0.0.0/8"}, via("eth1", inTo("192.168.0.1:80")),
		pass(policy.ReasonVirtualInterfaceNotIncluded)},
	{"a VM's TCP inside -i is captured", []string{"-k", "eth1", "-i", "10.0.0.0/8"}, via("eth1", inTo("10.1.0.1:80")),
		toOutbound(15001, policy.ReasonVirtualInterface)},
	{"-x does not apply to a VM's TCP", []string{"-k", "eth1", "-x", "10.0.0.0/8"}, via("eth1", inTo("10.1.0.1:80")),
		toOutbound(15001, policy.ReasonVirtualInterface)},
	{"-i empty: a VM's TCP passes", []string{"-k", "eth1", "-i", ""}, via("eth1", inTo("10.1.0.1:80")),
		pass(policy.ReasonVirtualInterfaceNotIncluded)},
	{"-k beats -c", []string{"-k", "eth1", "-c", "eth1"}, via("eth1", inTo("10.1.0.1:80")), toOutbound(15001, policy.ReasonVirtualInterface)},
	{"-k does not touch other interfaces", []string{"-k", "eth1"}, via("eth0", in(8080)), toInbound(15006, policy.ReasonInboundIncludedPort)},
	{"-k leaves outbound alone", []string{"-k", "eth1"}, via("eth1", out(app, app, unbound, "10.0.0.1:80", false)),
		toOutbound(15001, policy.ReasonIncludedCIDR)},

	// --drop-invalid drops packets, not connections: no verdict changes.
	{"--drop-invalid: outbound as without it", []string{"--drop-invalid"}, out(app, app, unbound, "10.0.0.1:80", false), toOutbound(15001, policy.ReasonIncludedCIDR)},
	{"--drop-invalid: inbound as without it", []string{"--drop-invalid"}, in(8080), toInbound(15006, policy.ReasonInboundIncludedPort)},
}

func TestDecideSettings(t *testing.T) { runDecide(t, settingsCases) }

func TestSettingsFlags(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
		env  map[string]string
		want func(c *policy.Config)
	}{
		{name: "-c", args: []string{"-c", "net1,net2"}, want: func(c *policy.Config) { c.ExcludeInterfaces = []string{"net1", "net2"} }},
		{name: "env ISTIO_EXCLUDE_INTERFACES", env: map[string]string{"ISTIO_EXCLUDE_INTERFACES": "net1"}, want: func(c *policy.Config) { c.ExcludeInterfaces = []string{"net1"} }},
		{name: "-k", args: []string{"--kube-virt-interfaces", "eth1"}, want: func(c *policy.Config) { c.KubeVirtInterfaces = []string{"eth1"} }},
		{name: "env KUBE_VIRT_INTERFACES", env: map[string]string{"KUBE_VIRT_INTERFACES": "eth1, eth2"}, want: func(c *policy.Config) { c.KubeVirtInterfaces = []string{"eth1", "eth2"} }},
		{name: "--drop-invalid bare", args: []string{"--drop-invalid"}, want: func(c *policy.Config) { c.DropInvalid = true }},
		{name: "env INVALID_DROP", env: map[string]string{"INVALID_DROP": "true"}, want: func(c *policy.Config) { c.DropInvalid = true }},
		{name: "env INVALID_DROP beats DROP_INVALID", env: map[string]string{"DROP_INVALID": "true", "INVALID_DROP": "false"}},
		{name: "--drop-invalid=false beats env", args: []string{"--drop-invalid=false"}, env: map[string]string{"INVALID_DROP": "true"}},
		{name: "env ISTIO_OUTBOUND_OWNER_GROUPS", env: map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "1000,2000"},
			want: func(c *policy.Config) {
				c.OutboundOwnerGroups = policy.OwnerGroups{Only: true, Include: []uint32{1000, 2000}}
			}},
		{name: "owner groups by name", env: map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "root,7"},
			want: func(c *policy.Config) {
				c.OutboundOwnerGroups = policy.OwnerGroups{Only: true, Include: []uint32{0, 7}}
			}},
		{name: "owner groups *", env: map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "*"}},
		{name: "env ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", env: map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "3000"},
			want: func(c *policy.Config) { c.OutboundOwnerGroups.Exclude = []uint32{3000} }},
		{name: "an explicitly empty include list captures no group", args: []string{"--istio-outbound-owner-groups="},
			want: func(c *policy.Config) { c.OutboundOwnerGroups.Only = true }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parse(tt.args, tt.env)
			require.NoError(t, err)
			want := policy.Default()
			if tt.want != nil {
				tt.want(&want)
			}
			require.Equal(t, want, cfg)
		})
	}
}

func TestSettingsFlagsErrors(t *testing.T) {
	many := "1"
	for i := 2; i <= policy.MaxOwnerGroupsInclude+1; i++ {
		many += ",1"
	}
	for _, tt := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{args: []string{"-c", "net+"}, want: `invalid -c/--istio-exclude-interfaces "net+": "net+" is an iptables wildcard`},
		{args: []string{"-k", "averyveryverylongname"}, want: "longer than 15 characters"},
		{args: []string{"-c", "0eth"}, want: "is not an interface name"},
		{env: map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "no-such-group-here"}, want: `invalid --istio-outbound-owner-groups (from $ISTIO_OUTBOUND_OWNER_GROUPS) "no-such-group-here": group "no-such-group-here" is not in this container's /etc/group`},
		{env: map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "1000-2000"}, want: `"1000-2000" is a range; list the groups`},
		{env: map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": many}, want: "65 groups, at most 64"},
		{env: map[string]string{"INVALID_DROP": "yes"}, want: `invalid --drop-invalid (from $INVALID_DROP) "yes": use true or false`},
	} {
		_, err := parse(tt.args, tt.env)
		require.ErrorContains(t, err, tt.want, "%q %v", tt.args, tt.env)
	}
}

func TestSettingsArgsRoundTrip(t *testing.T) {
	args := []string{"-c", "net1,net2", "-k", "eth1", "--drop-invalid", "--istio-outbound-owner-groups", "1000,2000",
		"--istio-outbound-owner-groups-exclude", "3000"}
	cfg := mustParse(t, args...)
	again := mustParse(t, cfg.Args()...)
	require.Equal(t, cfg, again)
}
