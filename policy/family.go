package policy

import (
	"fmt"
	"net/netip"
)

// IP families. istio-iptables writes the IPv4 rules for every pod and the same rules for
// IPv6 (ip6tables) only when it decides the pod is IPv6 (Config.IPv6, from the pod's
// addresses and --dual-stack: DecideIPv6). Each family's rules use that family's -i/-x
// ranges and nameservers, ::6 instead of 127.0.0.6 and ::1 instead of 127.0.0.1.

// EnvDualStack is the environment variable that turns dual stack on besides $DUAL_STACK:
// Istio's one switch for dual stack in the control and data plane, which istio-iptables
// and istio-cni read too. (Istio 1.18 renamed $ISTIO_AGENT_DUAL_STACK to it; istio-iptables
// does not read the old name.)
const EnvDualStack = "ISTIO_DUAL_STACK"

// Family is an IP family as istio renders it: one set of rules per family, in iptables or
// ip6tables. A v4-mapped address (::ffff:a.b.c.d) is IPv4: it is IPv4 on the wire.
type Family uint8

const (
	IPv4 Family = iota
	IPv6
)

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// FamilyOf is the family whose rules decide a connection to (or from) a.
func FamilyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// IPv6 counterparts of InboundPassthroughSource and Localhost, as istio's IPv6 rules name
// them. ::6 is not a loopback address: istio-iptables adds it to lo (ip -6 addr add ::6/128
// dev lo) so the proxy can bind it.
var (
	InboundPassthroughSource6 = netip.MustParseAddr("::6")
	Localhost6                = netip.IPv6Loopback()
)

// PassthroughSource is the source the proxy binds to forward inbound connections of f.
func (f Family) PassthroughSource() netip.Addr {
	if f == IPv6 {
		return InboundPassthroughSource6
	}
	return InboundPassthroughSource
}

// Localhost is the one loopback address of f the hairpin and localhost rules leave alone.
func (f Family) Localhost() netip.Addr {
	if f == IPv6 {
		return Localhost6
	}
	return Localhost
}

// Host is a as a single-address prefix of its family (/32 or /128), as istio writes them.
func Host(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// Families lists the families c captures: IPv4 always, IPv6 when c.IPv6.
func (c *Config) Families() []Family {
	if c.IPv6 {
		return []Family{IPv4, IPv6}
	}
	return []Family{IPv4}
}

// OutboundCIDRsOf returns -i's prefixes of family f (nil for All).
func (c *Config) OutboundCIDRsOf(f Family) []netip.Prefix {
	if f == IPv6 {
		return c.IPv6OutboundCIDRs()
	}
	return c.IPv4OutboundCIDRs()
}

// OutboundExcludeCIDRsOf returns -x's prefixes of family f.
func (c *Config) OutboundExcludeCIDRsOf(f Family) []netip.Prefix {
	if f == IPv6 {
		return c.IPv6OutboundExcludeCIDRs()
	}
	return c.IPv4OutboundExcludeCIDRs()
}

// DNSServersOf returns the nameservers of family f, in order.
func (c *Config) DNSServersOf(f Family) []netip.Addr {
	var out []netip.Addr
	for _, a := range c.DNSServers {
		if FamilyOf(a) == f {
			out = append(out, a)
		}
	}
	return out
}

// CapturesDNSOf reports whether f's rules send anything to the DNS agent: istio jumps to
// ISTIO_OUTPUT_DNS (and marks replies' conntrack zone) in a family only with
// --capture-all-dns or a nameserver of that family. The rest of DNS capture (port 53 left
// out of the local-destination and hairpin rules, the agent's own zones) follows
// CapturesDNS in both families.
func (c *Config) CapturesDNSOf(f Family) bool {
	return c.CapturesDNS() && (c.CaptureAllDNS || len(c.DNSServersOf(f)) > 0)
}

// PodIPv6 decides IPv6 capture from the pod's addresses as istio-iptables does (its
// getLocalIP, tools/common/config): it looks at the addresses of every interface in the
// kernel's order, skipping loopback and link-local ones, and without dual stack takes the
// family of the first; with dual stack, IPv6 when there is any IPv6 address. The kernel
// lists every IPv4 address before any IPv6 one, so without dual stack a pod with any IPv4
// address is IPv4, whichever address Kubernetes names first. The order of addrs does not
// matter. ::6 counts (it is no loopback address), as it does for istio on a second run.
func PodIPv6(addrs []netip.Addr, dualStack bool) bool {
	has4, has6 := false, false
	for _, a := range addrs {
		a = a.Unmap()
		if !a.IsValid() || a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() {
			continue
		}
		if a.Is4() {
			has4 = true
		} else {
			has6 = true
		}
	}
	if dualStack {
		return has6
	}
	return has6 && !has4
}

// DecideIPv6 sets c.IPv6 from the pod's addresses (PodIPv6) and c.DualStack. Every edge
// that knows the pod's addresses calls it once the flags are parsed: the init container
// (its interfaces), attach (the netns), the node agent (CNI result and API).
func (c *Config) DecideIPv6(podAddrs []netip.Addr) { c.IPv6 = PodIPv6(podAddrs, c.DualStack) }

// checkPrefixes refuses a v4-mapped prefix in -i or -x: istio would write it into its
// IPv6 rules, where it never matches (IPv4 dialled as ::ffff:a.b.c.d is IPv4 on the wire),
// so the setting would silently do nothing.
func checkPrefixes(prefixes []netip.Prefix) error {
	for _, p := range prefixes {
		if p.Addr().Is4In6() {
			v4 := netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0)).Masked()
			return fmt.Errorf("%s is an IPv4 range written as IPv6 (v4-mapped), which never matches: IPv4 is IPv4 on the wire, from any socket; write %s", p, v4)
		}
	}
	return nil
}
