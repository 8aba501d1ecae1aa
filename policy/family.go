package policy

import (
	"fmt"
	"net/netip"
)

// divert captures IPv4 only (and IPv4 dialled from dual-stack sockets as ::ffff:a.b.c.d):
// the programs leave native IPv6 alone, and the iptables backend writes no ip6tables rules.
// Until IPv6 capture lands, every setting that asks for IPv6 is refused here, where it is
// parsed, so the CLI, the init container and the node agent (annotations) refuse alike.

// ipv6Unsupported ends every refusal: why, in words a user can act on.
const ipv6Unsupported = "which divert does not capture (IPv6 is not yet supported: IPv4 only)"

// refuseIPv6 refuses an IPv6 prefix in -i (it asks for a capture divert cannot do) and in -x
// (divert never captures IPv6, so the exclusion would do nothing: say so rather than keep a
// setting that has no effect). v4-mapped prefixes are IPv6 too, as iptables reads them.
func refuseIPv6(prefixes []netip.Prefix, exclude bool) error {
	for _, p := range prefixes {
		if p.Addr().Is4() {
			continue
		}
		if exclude {
			return fmt.Errorf("%s is IPv6, %s, so IPv6 destinations are never captured already; list IPv4 ranges only", p, ipv6Unsupported)
		}
		return fmt.Errorf("%s is IPv6, %s; list IPv4 ranges only", p, ipv6Unsupported)
	}
	return nil
}

// IPv6PodError is a pod with an IPv6 address: divert would capture its IPv4 connections
// and let its IPv6 ones reach their destination without the proxy.
type IPv6PodError struct {
	// Addr is the pod's first IPv6 address that is neither loopback nor link-local.
	Addr netip.Addr
}

func (e *IPv6PodError) Error() string {
	return fmt.Sprintf("the pod has IPv6 address %s, %s: its IPv6 connections would bypass the proxy", e.Addr, ipv6Unsupported)
}

// CheckPodAddrs refuses a pod with an IPv6 address (an IPv6-only or dual-stack pod, in any
// order of addresses): capturing half of its traffic would be a silent bypass. Loopback and
// link-local addresses do not count (every interface has them); a v4-mapped address is IPv4.
func CheckPodAddrs(addrs []netip.Addr) error {
	for _, a := range addrs {
		a = a.Unmap()
		if a.Is4() || a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || !a.IsValid() {
			continue
		}
		return &IPv6PodError{Addr: a}
	}
	return nil
}
