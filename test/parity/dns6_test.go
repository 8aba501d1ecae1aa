package parity

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testpod"
)

// IPv6 DNS capture (shared/reference/dual-stack-dns-exclusions.rules): each family's rules
// send queries to their own nameservers to the agent, which listens on [::1]:15053 too.
// Flags are given whole; {ns1} is an IPv4 nameserver, {ns6} an IPv6 one, {other6} an IPv6
// DNS server that is not one.
var dnsScenarios6 = []dnsScenario{
	{name: "unconnected UDP to the IPv6 nameserver: the agent answers from it", flags: dnsDual, uid: appUID, gid: appUID, kind: testpod.UDPUnconnected, dst: "ns6:53"},
	{name: "connected UDP to the IPv6 nameserver", flags: dnsDual, uid: appUID, gid: appUID, kind: testpod.UDPConnected, dst: "ns6:53"},
	{name: "TCP to the IPv6 nameserver", flags: dnsDual, uid: appUID, gid: appUID, kind: testpod.TCPQuery, dst: "ns6:53"},
	{name: "the IPv4 nameserver still", flags: dnsDual, uid: appUID, gid: appUID, kind: testpod.UDPConnected, dst: "ns1:53"},
	{name: "UDP to another IPv6 DNS server passes", flags: dnsDual, uid: appUID, gid: appUID, kind: testpod.UDPUnconnected, dst: "other6:53"},
	{name: "TCP to another IPv6 DNS server goes to the proxy", flags: dnsDual, uid: appUID, gid: appUID, kind: testpod.TCPQuery, dst: "other6:53"},
	{name: "the proxy uid's IPv6 query reaches the nameserver", flags: dnsDual, uid: proxyUID, gid: proxyUID, kind: testpod.UDPUnconnected, dst: "ns6:53"},
	{name: "the proxy gid's IPv6 query reaches the nameserver", flags: dnsDual, uid: appUID, gid: proxyUID, kind: testpod.UDPConnected, dst: "ns6:53"},
	{name: "-o 53: the IPv6 nameserver answers itself", flags: append([]string{"-o", "53"}, dnsDual...), uid: appUID, gid: appUID, kind: testpod.UDPUnconnected, dst: "ns6:53"},
	{name: "-x the IPv6 nameserver: still captured (DNS comes first)", flags: append([]string{"-x", "{ns6}/128"}, dnsDual...), uid: appUID, gid: appUID, kind: testpod.UDPConnected, dst: "ns6:53"},
	{name: "IPv4 nameserver only: an IPv6 query passes", flags: []string{"--dual-stack", "--redirect-dns", "--dns-servers", "{ns1}"}, uid: appUID, gid: appUID, kind: testpod.UDPUnconnected, dst: "ns6:53"},
	{name: "IPv4 nameserver only: TCP to the IPv6 one goes to the proxy", flags: []string{"--dual-stack", "--redirect-dns", "--dns-servers", "{ns1}"}, uid: appUID, gid: appUID, kind: testpod.TCPQuery, dst: "ns6:53"},
	{name: "capture-all: any IPv6 destination's port 53", flags: []string{"--dual-stack", "--redirect-dns", "--capture-all-dns"}, uid: appUID, gid: appUID, kind: testpod.UDPUnconnected, dst: "other6:53"},
	{name: "capture-all: TCP too", flags: []string{"--dual-stack", "--redirect-dns", "--capture-all-dns"}, uid: appUID, gid: appUID, kind: testpod.TCPQuery, dst: "other6:53"},
	{name: "one unconnected socket asks ns6, then another: its own answer", flags: dnsDual, uid: appUID, gid: appUID, kind: testpod.UDPUnconnected, first: "ns6:53", dst: "other6:53"},
	{name: "without --dual-stack: no IPv6 rules, the nameserver answers", flags: []string{"--redirect-dns", "--dns-servers", "{ns1},{ns6}"}, uid: appUID, gid: appUID, kind: testpod.UDPConnected, dst: "ns6:53"},
}

var dnsDual = []string{"--dual-stack", "--redirect-dns", "--dns-servers", "{ns1},{ns6}"}

// newDNSWorld6 is newDNSWorld on a dual-stack pod: the agent and the proxy listen on both
// families' loopback, IPv6 DNS servers outside.
func newDNSWorld6(t *testing.T) *dnsWorld {
	pod := testpod.NewStack(t, testpod.DualStack)
	w := &dnsWorld{world: &world{pod: pod}, servers: map[string]netip.Addr{
		"ns1": pod.Net.Addrs[3], "ns6": pod.Net.Addrs6[3], "other6": pod.Net.Addrs6[0],
	}}
	w.procs = append(w.procs, pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: proxyUID, GID: proxyUID, V6Only: true,
		Listen: []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:15001"), netip.MustParseAddrPort("[::]:15001")}}))
	for _, lo := range []netip.Addr{policy.Localhost, policy.Localhost6} {
		agent := netip.AddrPortFrom(lo, policy.DNSAgentPort)
		w.procs = append(w.procs, pod.UDPServer(t, "agent", agent, proxyUID, proxyUID), pod.Server(t, "agent", agent, proxyUID, proxyUID))
	}
	for name, addr := range w.servers {
		w.procs = append(w.procs, pod.Net.UDPServer(t, name, netip.AddrPortFrom(addr, 53)),
			pod.Net.Server(t, name, netip.AddrPortFrom(addr, 53)))
	}
	return w
}

func TestDNSParityIPv6(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			w := newDNSWorld6(t)
			b.setup(t, w.world)
			for _, s := range dnsScenarios6 {
				t.Run(s.name, func(t *testing.T) {
					var names []string
					for name, a := range w.servers {
						names = append(names, "{"+name+"}", a.String())
					}
					flags := make([]string, len(s.flags))
					for i, f := range s.flags {
						flags[i] = strings.NewReplacer(names...).Replace(f)
					}
					cfg := w.world.config(t, scenario{flags: flags})
					w.row(t, b, s, cfg)
				})
			}
		})
	}
}
