package policy

import (
	"fmt"
	"net/netip"
	"slices"
)

// Direction is which way a connection goes relative to the pod.
type Direction uint8

const (
	Outbound Direction = iota // made by a process in the pod
	Inbound                   // arriving from outside the pod
)

// Protocol is the transport of a connection (TCP unless said otherwise).
type Protocol uint8

const (
	TCP Protocol = iota
	UDP          // only queries to port 53 are ever captured (DNS capture)
)

func (p Protocol) String() string {
	if p == UDP {
		return "udp"
	}
	return "tcp"
}

// Conn describes one new TCP connection (or UDP datagram, or UDP connect) as the kernel
// sees it when capture is decided.
type Conn struct {
	Direction Direction
	// Proto is TCP or UDP.
	Proto Protocol
	// UID and GID of the process that made an outbound connection: as xt_owner sees them,
	// the fsuid and fsgid of the socket file (those of the process when it made the socket).
	// Supplementary groups never count: istio's rules do not use --suppl-groups.
	UID, GID uint32
	// Src is the address an outbound socket was bound to before connect (invalid if unbound).
	Src netip.Addr
	// Dst is the destination the connection was made to.
	Dst netip.AddrPort
	// DstLocal is true when Dst is an address of the pod itself (it routes via lo): its own
	// IPs and all of 127.0.0.0/8.
	DstLocal bool
	// SrcForeign is true when Src is an address that is not the pod's (SrcForeign): only a
	// transparent socket (IP_TRANSPARENT, as Envoy's original_src) can bind one.
	SrcForeign bool
	// Iface is the interface an inbound connection arrives on, or the one routing sends an
	// outbound connection out through (lo for DstLocal, whatever this says); "" when it
	// does not matter (no -c or -k setting names it).
	Iface string
	// BoundLo is true for a socket bound to lo (SO_BINDTODEVICE): its SYN leaves through lo
	// whatever its destination.
	BoundLo bool
	// BoundDevice is true for a socket bound to any interface (SO_BINDTODEVICE, or bind()
	// to a scoped link-local address), lo included: an IPv6 link-local destination needs one.
	BoundDevice bool
}

// Refusal is how a TCP connect fails in the kernel whatever the rules.
type Refusal uint8

const (
	NotRefused     Refusal = iota
	Unreachable            // ENETUNREACH: a broadcast or multicast route
	Invalid                // EINVAL: the route lookup itself fails
	Unanswered             // the SYN goes where nothing answers: connect times out
	NoRouteFromLo          // ENETUNREACH: IPv6 from a socket bound to lo to anything but ::1
	NeedsInterface         // EINVAL: an IPv6 link-local destination from a socket bound to none
)

func (r Refusal) String() string {
	switch r {
	case Unreachable:
		return "ENETUNREACH: a broadcast or multicast route"
	case Invalid:
		return "EINVAL: a loopback source cannot leave the pod"
	case Unanswered:
		return "a timeout: bound to lo, the SYN goes where nothing answers"
	case NoRouteFromLo:
		return "ENETUNREACH: bound to lo, no IPv6 route but ::1's leaves it"
	case NeedsInterface:
		return "EINVAL: a link-local destination needs an interface"
	}
	return "not refused"
}

// Refused says whether, and how, a TCP connect to conn fails whatever iptables' or divert's
// rules say, so that neither decides it and the app sees the kernel's outcome. The route
// lookup fails before any packet exists for a broadcast or multicast route
// (255.255.255.255, 224.0.0.0/4, lo's 127.255.255.255: ENETUNREACH) and for a loopback
// source leaving the pod (EINVAL); a socket bound to lo sends its SYN out lo, where nothing
// answers an address outside 127/8, not even the proxy after iptables' hairpin REDIRECT.
// The pod's subnet broadcast address is a broadcast route too, but neither this model nor
// the programs know the pod's prefixes (docs/semantics.md). 0.x.y.z is unicast (Linux 5.3+).
// Native IPv6 has its own cases (refused6).
func (conn Conn) Refused() Refusal {
	conn = conn.Routed()
	dst := conn.Dst.Addr().Unmap()
	if conn.Direction != Outbound || conn.Proto != TCP {
		return NotRefused
	}
	if !dst.Is4() {
		return conn.refused6(dst)
	}
	switch {
	case dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || dst.IsMulticast() || dst == netip.AddrFrom4([4]byte{127, 255, 255, 255}):
		return Unreachable
	case dst.IsLoopback():
		return NotRefused
	case conn.BoundLo:
		return Unanswered
	case conn.Src.IsValid() && conn.Src.Unmap().IsLoopback() && !conn.DstLocal:
		return Invalid
	}
	return NotRefused
}

// refused6 is Refused for a native IPv6 destination, as ip6tables' kernel refuses it:
// tcp_v6_connect fails a multicast destination (ENETUNREACH) and a link-local one from a
// socket bound to no interface (EINVAL), after the connect6 hook ran; the route lookup
// from a socket bound to lo finds nothing but ::1 (ENETUNREACH, where IPv4 sends the SYN
// out lo). IPv6 has no broadcast, and a ::1 source is not refused: the SYN leaves, and the
// peer drops it (RFC 4291), which is what the rules decide, not a refusal.
func (conn Conn) refused6(dst netip.Addr) Refusal {
	switch {
	case dst.IsMulticast():
		return Unreachable
	case dst == Localhost6:
		return NotRefused
	case conn.BoundLo:
		return NoRouteFromLo
	case dst.IsLinkLocalUnicast() && !conn.BoundDevice && !conn.BoundLo:
		return NeedsInterface
	}
	return NotRefused
}

// Routed is conn as the kernel routes it: connect() to 0.0.0.0 reaches this host, at the
// socket's bound source if it has one, else at 127.0.0.1 (ip_route_output's rule); connect()
// to :: reaches ::1 whatever the socket is bound to (tcp_v6_connect's and
// ip6_datagram_connect's rule). That is the destination istio's rules and divert's
// programs both decide on and the proxy reads back.
func (conn Conn) Routed() Conn {
	d := conn.Dst.Addr().Unmap()
	if conn.Direction != Outbound || !d.IsUnspecified() {
		return conn
	}
	dst := Localhost6
	if d.Is4() {
		dst = Localhost
		if conn.Src.IsValid() && !conn.Src.Unmap().IsUnspecified() {
			dst = conn.Src.Unmap()
		}
	}
	conn.Dst = netip.AddrPortFrom(dst, conn.Dst.Port())
	conn.DstLocal = true
	return conn
}

// Action is what happens to a connection.
type Action uint8

const (
	Pass             Action = iota // untouched
	RedirectOutbound               // to the proxy's outbound port (-p)
	RedirectInbound                // to the proxy's inbound capture port (-z)
	RedirectDNS                    // to istio-agent's DNS proxy (DNSAgentPort)
)

func (a Action) String() string {
	switch a {
	case RedirectOutbound:
		return "redirect-outbound"
	case RedirectInbound:
		return "redirect-inbound"
	case RedirectDNS:
		return "redirect-dns"
	}
	return "pass"
}

// Reason names the rule that decided. The numbering is shared with bpf/types.h's enum
// reason (a test keeps them equal) and indexes the kernel's per-reason counters.
type Reason uint8

const (
	ReasonNone                 Reason = iota // no rule: IPv6 where istio writes no IPv6 rules, non-DNS UDP
	ReasonExcludedOutboundPort               // -o
	ReasonInboundPassthrough                 // bound to 127.0.0.6, to the pod itself
	ReasonProxyHairpin                       // the proxy calling its own pod
	ReasonLocalDestination                   // the app calling its own pod
	ReasonProxyUID                           // -u
	ReasonProxyGID                           // -g
	ReasonLocalhost                          // to 127.0.0.1
	ReasonExcludedCIDR                       // -x
	ReasonIncludedOutboundPort               // -q
	ReasonIncludedCIDR                       // -i
	ReasonNotIncluded                        // fell off the end of the outbound rules
	ReasonInboundTunnelPort                  // -e
	ReasonInboundExcludedPort                // -d
	ReasonInboundIncludedPort                // -b
	ReasonInboundNotIncluded                 // -b does not list the port
	ReasonDNSCaptured                        // a query to a nameserver (or any, -capture-all-dns)
	ReasonDNSNotCaptured                     // a UDP query to port 53 of another address
)

// The reasons of the settings in settings.go.
const (
	ReasonOwnerGroupNotIncluded       Reason = iota + ReasonDNSNotCaptured + 1 // $ISTIO_OUTBOUND_OWNER_GROUPS does not list the group
	ReasonOwnerGroupExcluded                                                   // $ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE lists it
	ReasonExcludedInterface                                                    // -c
	ReasonVirtualInterface                                                     // -k: captured as outbound
	ReasonVirtualInterfaceNotIncluded                                          // -k: -i does not include it, or not TCP
	NumReasons
)

var reasonNames = [NumReasons]string{
	ReasonNone:                 "none",
	ReasonExcludedOutboundPort: "excluded-outbound-port",
	ReasonInboundPassthrough:   "inbound-passthrough",
	ReasonProxyHairpin:         "proxy-hairpin",
	ReasonLocalDestination:     "local-destination",
	ReasonProxyUID:             "proxy-uid",
	ReasonProxyGID:             "proxy-gid",
	ReasonLocalhost:            "localhost",
	ReasonExcludedCIDR:         "excluded-cidr",
	ReasonIncludedOutboundPort: "included-outbound-port",
	ReasonIncludedCIDR:         "included-cidr",
	ReasonNotIncluded:          "not-included",
	ReasonInboundTunnelPort:    "inbound-tunnel-port",
	ReasonInboundExcludedPort:  "inbound-excluded-port",
	ReasonInboundIncludedPort:  "inbound-included-port",
	ReasonInboundNotIncluded:   "inbound-not-included",
	ReasonDNSCaptured:          "dns-captured",
	ReasonDNSNotCaptured:       "dns-not-captured",

	ReasonOwnerGroupNotIncluded:       "owner-group-not-included",
	ReasonOwnerGroupExcluded:          "owner-group-excluded",
	ReasonExcludedInterface:           "excluded-interface",
	ReasonVirtualInterface:            "virtual-interface",
	ReasonVirtualInterfaceNotIncluded: "virtual-interface-not-included",
}

func (r Reason) String() string {
	if r < NumReasons {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// Reasons lists every reason, in counter order.
func Reasons() []Reason {
	rs := make([]Reason, 0, NumReasons)
	for r := ReasonNone; r < NumReasons; r++ {
		rs = append(rs, r)
	}
	return rs
}

// Verdict is the outcome for a connection and the rule that decided it.
type Verdict struct {
	Action Action
	Reason Reason
	// Port is where a redirected connection lands (0 for Pass).
	Port uint16
}

func (v Verdict) String() string {
	if v.Action == Pass {
		return fmt.Sprintf("pass (%s)", v.Reason)
	}
	return fmt.Sprintf("%s to port %d (%s)", v.Action, v.Port, v.Reason)
}

// Decide is the reference model: what istio-iptables' rules do with conn, first match wins.
// The order is the order of the rules in ISTIO_OUTPUT and ISTIO_INBOUND; the kernel running
// those rules is the oracle for this function (see test/parity).
//
// Each family is decided by its own rules (iptables, ip6tables), the same rules with
// family's addresses: ::6 as the passthrough source, ::1 as localhost, the family's -i/-x
// ranges and nameservers. A v4-mapped destination (::ffff:a.b.c.d, dialled from a
// dual-stack socket) is IPv4 on the wire and decided as such. A native IPv6 connection of a
// pod istio writes no IPv6 rules for (c.IPv6 false) passes with ReasonNone: no rule decides
// it, nothing counts it. UDP is only ever captured for DNS: any other UDP passes with
// ReasonNone too (no program decides it), and inbound UDP is never captured.
func (c *Config) Decide(conn Conn) Verdict {
	conn = conn.Routed()
	conn.Dst = netip.AddrPortFrom(conn.Dst.Addr().Unmap(), conn.Dst.Port())
	conn.Src = conn.Src.Unmap()
	fam := FamilyOf(conn.Dst.Addr())
	if fam == IPv6 && !c.IPv6 {
		return Verdict{Action: Pass, Reason: ReasonNone}
	}
	udp := conn.Proto == UDP
	if udp && (conn.Direction == Inbound || !c.dnsPortSpecial(conn.Dst.Port())) {
		return Verdict{Action: Pass, Reason: ReasonNone}
	}
	// Left to the kernel, which fails it before any rule runs; no program counts it.
	if conn.Refused() != NotRefused {
		return Verdict{Action: Pass, Reason: ReasonNone}
	}
	// -k and -c: rules in the kernel's chains, before the jumps into istio's.
	if v, ok := c.decideInterface(conn, udp); ok {
		return v
	}
	if conn.Direction == Inbound {
		return c.decideInbound(conn.Dst.Port())
	}
	pass := func(r Reason) Verdict { return Verdict{Action: Pass, Reason: r} }
	hairpin := Verdict{Action: RedirectInbound, Reason: ReasonProxyHairpin, Port: c.InboundCapturePort}
	dst, port := conn.Dst.Addr(), conn.Dst.Port()
	localhost := fam.Localhost()
	// The shape of "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport <tunnel>" in the hairpin rules
	// (::1/128 in IPv6's).
	hairpinnable := !udp && conn.DstLocal && dst != localhost && port != c.InboundTunnelPort
	// istio leaves out its "-o lo -m owner ! --uid-owner/--gid-owner -j RETURN" rules when
	// -i names a loopback range, so that range can be captured. With DNS capture they are
	// "-p tcp ! --dport 53", so a query to a nameserver on the pod's own address reaches the
	// DNS rules (UDP here is always a DNS query).
	localReturns := !c.CapturesLoopback() && !udp && !c.dnsPortSpecial(port)
	// With DNS capture the uid hairpin leaves port 53 alone too ("! --dports 53,<tunnel>");
	// istio does not change the gid hairpin.
	uidHairpinnable := hairpinnable && !c.dnsPortSpecial(port)

	// -o is rendered before everything else, so it even beats the hairpin.
	if slices.Contains(c.OutboundExcludePorts, port) {
		return pass(ReasonExcludedOutboundPort)
	}
	if conn.DstLocal && conn.Src == fam.PassthroughSource() {
		return pass(ReasonInboundPassthrough)
	}
	if conn.DstLocal && conn.SrcForeign && c.TransparentPassthrough() {
		return pass(ReasonInboundPassthrough)
	}
	if uidHairpinnable && conn.UID == c.ProxyUID {
		return hairpin
	}
	if localReturns && conn.DstLocal && conn.UID != c.ProxyUID {
		return pass(ReasonLocalDestination)
	}
	if conn.UID == c.ProxyUID {
		return pass(ReasonProxyUID)
	}
	// The gid twins of the three rules above; with localReturns, every local destination
	// was already decided, so the gid hairpin only fires when -i captures loopback.
	if hairpinnable && conn.GID == c.ProxyGID {
		return hairpin
	}
	if localReturns && conn.DstLocal && conn.GID != c.ProxyGID {
		return pass(ReasonLocalDestination)
	}
	if conn.GID == c.ProxyGID {
		return pass(ReasonProxyGID)
	}
	// The owner-group rule: after the proxy's own, before DNS and everything else.
	if r, ok := c.ownerGroupPasses(conn.GID); ok {
		return pass(r)
	}
	// ISTIO_OUTPUT_DNS: after the proxy's own traffic, before everything else.
	if c.dnsPortSpecial(port) && c.DNSCaptures(dst) {
		return Verdict{Action: RedirectDNS, Reason: ReasonDNSCaptured, Port: DNSAgentPort}
	}
	if dst == localhost {
		return pass(ReasonLocalhost)
	}
	if containsAddr(c.OutboundExcludeCIDRs, dst) {
		return pass(ReasonExcludedCIDR)
	}
	// -q and ISTIO_REDIRECT are "-p tcp": the rest of UDP passes.
	if udp {
		return pass(ReasonDNSNotCaptured)
	}
	redirect := func(r Reason) Verdict { return Verdict{Action: RedirectOutbound, Reason: r, Port: c.ProxyPort} }
	if slices.Contains(c.OutboundPorts, port) {
		return redirect(ReasonIncludedOutboundPort)
	}
	if c.OutboundCIDRs.Contains(dst) {
		return redirect(ReasonIncludedCIDR)
	}
	return pass(ReasonNotIncluded)
}

func (c *Config) decideInbound(port uint16) Verdict {
	pass := func(r Reason) Verdict { return Verdict{Action: Pass, Reason: r} }
	if port == c.InboundTunnelPort && c.InboundTunnelPasses() {
		return pass(ReasonInboundTunnelPort)
	}
	if slices.Contains(c.InboundExcludes(), port) {
		return pass(ReasonInboundExcludedPort)
	}
	if c.InboundPorts.Contains(port) {
		return Verdict{Action: RedirectInbound, Reason: ReasonInboundIncludedPort, Port: c.InboundCapturePort}
	}
	return pass(ReasonInboundNotIncluded)
}
