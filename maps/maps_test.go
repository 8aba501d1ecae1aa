package maps_test

import (
	"cmp"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testutil"
)

// newMaps creates one pod's maps, without programs.
func newMaps(tb testing.TB) *maps.Maps {
	tb.Helper()
	testutil.RequirePrivileged(tb)
	var m bpf.DivertMaps
	if err := bpf.LoadDivertObjects(&m, nil); err != nil {
		tb.Fatalf("create maps: %v", err)
	}
	tb.Cleanup(func() { m.Close() })
	return &m
}

// ReadPolicy gives back what Apply wrote, as Apply renders it (see ReadPolicy's doc), and
// an update in place reads back as the new policy alone.
func TestReadPolicyInvertsApply(t *testing.T) {
	m := newMaps(t)
	local := []netip.Addr{netip.MustParseAddr("fd00::7"), netip.MustParseAddr("10.1.0.7"), netip.MustParseAddr("10.1.0.5")}
	// IPv6 settings are set on the parsed Config: the maps hold them whatever the flags
	// accept.
	ipv6 := func(include, exclude string, dns ...string) func(*policy.Config) {
		return func(c *policy.Config) {
			c.IPv6 = true
			if include != "" {
				c.OutboundCIDRs.Prefixes = append(c.OutboundCIDRs.Prefixes, netip.MustParsePrefix(include))
			}
			if exclude != "" {
				c.OutboundExcludeCIDRs = append(c.OutboundExcludeCIDRs, netip.MustParsePrefix(exclude))
			}
			for _, d := range dns {
				c.DNSServers = append(c.DNSServers, netip.MustParseAddr(d))
			}
		}
	}
	for _, tc := range []struct {
		args   []string
		mutate func(*policy.Config)
	}{
		{},
		{args: []string{"-b", "8080,443", "-d", "9090", "-q", "5432,22", "-o", "3306", "-i", "10.0.0.0/8,9.0.0.0/8,127.1.2.3/32", "-x", "10.96.0.0/12"}},
		{args: []string{"-m", "TPROXY", "-p", "16001", "-z", "16006", "-e", "16008", "-u", "1000", "-g", "2000", "-b", ""}},
		{args: []string{"--redirect-dns", "--dns-servers", "10.96.0.11,10.96.0.10"}},
		{args: []string{"--redirect-dns", "--capture-all-dns", "-i", ""}},
		{args: []string{"--capture-all-dns"}},
		{args: []string{"--istio-outbound-owner-groups", "2000,1000"}},
		{args: []string{"--istio-outbound-owner-groups-exclude", "3001,3000"}},
		{args: []string{"--istio-outbound-owner-groups", ""}},
		{mutate: ipv6("", "")},
		{args: []string{"-i", "10.0.0.0/8", "-x", "10.96.0.0/12"}, mutate: ipv6("fd00::/8", "fd00:10:96::/112")},
		{args: []string{"-i", "", "-x", ""}, mutate: ipv6("::ffff:0:0/96", "::/0")},
		{args: []string{"--redirect-dns", "--dns-servers", "10.96.0.10"}, mutate: ipv6("", "", "fd00:10:96::a")},
		{},
	} {
		args := tc.args
		cfg, err := policy.ParseArgs(policy.Default(), args...)
		if err != nil {
			t.Fatalf("%q: %v", args, err)
		}
		if tc.mutate != nil {
			tc.mutate(&cfg)
		}
		if err := maps.Apply(m, &cfg, local); err != nil {
			t.Fatalf("%q: apply: %v", args, err)
		}
		got, gotLocal, err := maps.ReadPolicy(m)
		if err != nil {
			t.Fatalf("%q: read back: %v", args, err)
		}
		want := cfg
		want.InboundPorts.Ports = sorted(want.InboundPorts.Ports)
		want.InboundExcludePorts = sorted(cfg.InboundExcludes())
		want.OutboundPorts, want.OutboundExcludePorts = sorted(want.OutboundPorts), sorted(want.OutboundExcludePorts)
		byText := func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) }
		want.OutboundCIDRs.Prefixes = slices.Clone(cfg.OutboundCIDRs.Prefixes)
		slices.SortFunc(want.OutboundCIDRs.Prefixes, byText)
		want.OutboundExcludeCIDRs = slices.Clone(cfg.OutboundExcludeCIDRs)
		slices.SortFunc(want.OutboundExcludeCIDRs, byText)
		if len(want.DNSServers) == 0 {
			want.DNSServers = nil
		}
		want.DNSServers = slices.Clone(want.DNSServers)
		slices.SortFunc(want.DNSServers, netip.Addr.Compare)
		want.OutboundOwnerGroups.Include = sorted(want.OutboundOwnerGroups.Include)
		want.OutboundOwnerGroups.Exclude = sorted(want.OutboundOwnerGroups.Exclude)
		def := policy.Default()
		want.TProxyMark, want.TProxyRouteTable = def.TProxyMark, def.TProxyRouteTable
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%q: read back\n %+v\nwant\n %+v", args, got, want)
		}
		if wantLocal := []netip.Addr{local[2], local[1], local[0]}; !slices.Equal(gotLocal, wantLocal) {
			t.Errorf("%q: local addresses %v, want %v", args, gotLocal, wantLocal)
		}
		if got.Decide(policy.Conn{Direction: policy.Inbound, Dst: netip.MustParseAddrPort("10.1.0.5:8080"), DstLocal: true}) !=
			cfg.Decide(policy.Conn{Direction: policy.Inbound, Dst: netip.MustParseAddrPort("10.1.0.5:8080"), DstLocal: true}) {
			t.Errorf("%q: the policy read back decides otherwise", args)
		}
	}
}

// sorted is a sorted copy of s, nil when s is empty: as ReadPolicy returns lists.
func sorted[T cmp.Ordered](s []T) []T {
	if len(s) == 0 {
		return nil
	}
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
