// Package traceevent decodes the records divert's programs write to the node's trace ring
// buffer (bpf/trace.h, struct trace_event): the one decoder of `divert trace` and of the
// tests that check the verdict counters against it. It stays free of Kubernetes: divert
// (the init container) builds it in.
package traceevent

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/policy"
)

// Verdicts names the verdicts as `divert trace --verdict` and its output do.
var Verdicts = map[string]bpf.DivertTraceVerdict{
	"passed":   bpf.DivertTraceVerdictTRACE_PASSED,
	"captured": bpf.DivertTraceVerdictTRACE_CAPTURED,
	"dropped":  bpf.DivertTraceVerdictTRACE_DROPPED,
}

// VerdictName is v's name in Verdicts, "" for none.
func VerdictName(v bpf.DivertTraceVerdict) string {
	for name, x := range Verdicts {
		if x == v {
			return name
		}
	}
	return ""
}

// Event is one record: a decision (one run of connect4/6, sendmsg or sk_lookup), or, with
// Connected, the source a TCP connect got once the kernel picked it.
type Event struct {
	Inbound   bool // sk_lookup: from outside the pod; else the pod's own connect or send
	UDP       bool
	Connected bool           // not a decision: Src is the source the socket Cookie got
	Src, Dst  netip.AddrPort // Dst: the original destination; Src as known at the decision
	Verdict   bpf.DivertTraceVerdict
	Reason    policy.Reason
	ToPort    uint16 // captured: the port on localhost it went to (inbound: the listener's)
	UID, GID  uint32 // outbound: the socket's owner, as the rules match it
	CgroupID  uint64 // outbound: the connecting task's cgroup (the pod's or below)
	Cookie    uint64 // outbound: the socket's
}

// Decode reads one record as the ring buffer holds it.
func Decode(raw []byte) (Event, error) {
	var r bpf.DivertTraceEvent
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &r); err != nil {
		return Event{}, fmt.Errorf("decode a trace record of %d bytes: %w", len(raw), err)
	}
	return Event{Inbound: r.Inbound != 0, UDP: r.Protocol == 17, Connected: r.Connected != 0,
		Src: netip.AddrPortFrom(inetAddr(r.Src.W), r.SrcPort), Dst: netip.AddrPortFrom(inetAddr(r.Dst.W), r.DstPort),
		Verdict: bpf.DivertTraceVerdict(r.Verdict), Reason: policy.Reason(r.Reason), ToPort: r.ToPort,
		UID: r.Uid, GID: r.Gid, CgroupID: r.CgroupId, Cookie: r.Cookie}, nil
}

// inetAddr reads struct inet_addr (network byte order words, IPv4 as ::ffff:a.b.c.d).
func inetAddr(w [4]uint32) netip.Addr {
	var b [16]byte
	for i, x := range w {
		// The words are in network order in memory; on this little-endian target the
		// uint32 holds them byte-swapped.
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(x), byte(x>>8), byte(x>>16), byte(x>>24)
	}
	return netip.AddrFrom16(b).Unmap()
}

// AwaitsSource says e is a decision whose source comes later, in the Connected record of
// the same Cookie: a TCP connect is decided before the kernel picks its source
// (bpf/trace.h), and its record comes before the SYN leaves.
func (e Event) AwaitsSource() bool {
	return !e.Inbound && !e.UDP && !e.Connected && e.Cookie != 0
}

// Direction is "inbound" or "outbound".
func (e Event) Direction() string {
	if e.Inbound {
		return "inbound"
	}
	return "outbound"
}

// Protocol is "tcp" or "udp".
func (e Event) Protocol() string {
	if e.UDP {
		return "udp"
	}
	return "tcp"
}

// To is where a captured decision sent it: the proxy's listening port inbound (":15006";
// the address is the pod's own), the family's localhost outbound; "" if not captured.
func (e Event) To() string {
	switch {
	case e.ToPort == 0:
		return ""
	case e.Inbound:
		return fmt.Sprintf(":%d", e.ToPort)
	case e.Dst.Addr().Is4():
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), e.ToPort).String()
	default:
		return netip.AddrPortFrom(netip.IPv6Loopback(), e.ToPort).String()
	}
}

// Conn identifies the connection a decision is of: the socket for the pod's own (a
// socket connects once; its datagrams share it), the 4-tuple for inbound (every lookup of
// one connection's segments runs sk_lookup with the same one).
func (e Event) Conn() string {
	if e.Inbound {
		return fmt.Sprintf("inbound %s -> %s", e.Src, e.Dst)
	}
	return fmt.Sprintf("outbound socket %#x", e.Cookie)
}

// String is the decision as `divert trace` prints it, after the time and the pod:
// "outbound tcp 127.0.0.1:48312 -> 10.96.0.10:80 captured included-cidr -> 127.0.0.1:15001 uid 1000 gid 1000".
func (e Event) String() string {
	s := fmt.Sprintf("%s %s %s -> %s %s %s", e.Direction(), e.Protocol(), e.Src, e.Dst, VerdictName(e.Verdict), e.Reason)
	if to := e.To(); to != "" {
		s += " -> " + to
	}
	if !e.Inbound {
		s += fmt.Sprintf(" uid %d gid %d", e.UID, e.GID)
	}
	return s
}
