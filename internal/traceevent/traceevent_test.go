package traceevent

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/policy"
)

// inet is a, as struct inet_addr holds it: network byte order words, IPv4 v4-mapped.
func inet(a netip.Addr) bpf.DivertInetAddr {
	b := a.As16()
	var r bpf.DivertInetAddr
	for i := range r.W {
		r.W[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return r
}

func encode(t *testing.T, r bpf.DivertTraceEvent) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, &r); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestDecode: records as the programs write them read back as the decisions they are,
// and print as divert trace prints them.
func TestDecode(t *testing.T) {
	v4, v6 := netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00::5")
	for _, c := range []struct {
		name string
		r    bpf.DivertTraceEvent
		want Event
		line string
	}{
		{"outbound ipv4 captured",
			bpf.DivertTraceEvent{CgroupId: 42, Src: inet(netip.MustParseAddr("127.0.0.1")), Dst: inet(v4), Uid: 1000, Gid: 1001,
				SrcPort: 48312, DstPort: 80, ToPort: 15001, Reason: uint8(policy.ReasonIncludedCIDR),
				Verdict: uint8(bpf.DivertTraceVerdictTRACE_CAPTURED), Protocol: 6, Cookie: 0x1234},
			Event{Src: netip.MustParseAddrPort("127.0.0.1:48312"), Dst: netip.AddrPortFrom(v4, 80), ToPort: 15001,
				Verdict: bpf.DivertTraceVerdictTRACE_CAPTURED, Reason: policy.ReasonIncludedCIDR, UID: 1000, GID: 1001, CgroupID: 42, Cookie: 0x1234},
			"outbound tcp 127.0.0.1:48312 -> 10.96.0.10:80 captured included-cidr -> 127.0.0.1:15001 uid 1000 gid 1001"},
		{"outbound ipv6 udp passed",
			bpf.DivertTraceEvent{Src: inet(netip.IPv6Unspecified()), Dst: inet(v6), DstPort: 53, Reason: uint8(policy.ReasonProxyUID),
				Verdict: uint8(bpf.DivertTraceVerdictTRACE_PASSED), Protocol: 17, Uid: 1337, Gid: 1337},
			Event{UDP: true, Src: netip.AddrPortFrom(netip.IPv6Unspecified(), 0), Dst: netip.AddrPortFrom(v6, 53),
				Verdict: bpf.DivertTraceVerdictTRACE_PASSED, Reason: policy.ReasonProxyUID, UID: 1337, GID: 1337},
			"outbound udp [::]:0 -> [fd00::5]:53 passed proxy-uid uid 1337 gid 1337"},
		{"inbound ipv6 captured",
			bpf.DivertTraceEvent{Src: inet(netip.MustParseAddr("fd00::9")), Dst: inet(v6), SrcPort: 41234, DstPort: 8080, ToPort: 15006,
				Reason: uint8(policy.ReasonInboundIncludedPort), Verdict: uint8(bpf.DivertTraceVerdictTRACE_CAPTURED), Protocol: 6,
				Inbound: 1, Uid: ^uint32(0), Gid: ^uint32(0)},
			Event{Inbound: true, Src: netip.MustParseAddrPort("[fd00::9]:41234"), Dst: netip.AddrPortFrom(v6, 8080), ToPort: 15006,
				Verdict: bpf.DivertTraceVerdictTRACE_CAPTURED, Reason: policy.ReasonInboundIncludedPort, UID: ^uint32(0), GID: ^uint32(0)},
			"inbound tcp [fd00::9]:41234 -> [fd00::5]:8080 captured inbound-included-port -> :15006"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := Decode(encode(t, c.r))
			if err != nil {
				t.Fatal(err)
			}
			if got != c.want {
				t.Errorf("decoded %+v\n  want %+v", got, c.want)
			}
			if s := got.String(); s != c.line {
				t.Errorf("prints %q\n  want %q", s, c.line)
			}
		})
	}
	if _, err := Decode(make([]byte, 10)); err == nil {
		t.Errorf("a short record decoded")
	}
}

// TestAwaitsSource: only an outbound TCP decision waits for its socket's source.
func TestAwaitsSource(t *testing.T) {
	for _, c := range []struct {
		e    Event
		want bool
	}{
		{Event{Cookie: 1}, true},
		{Event{Cookie: 1, Connected: true}, false},
		{Event{Cookie: 1, UDP: true}, false},
		{Event{Inbound: true}, false},
		{Event{}, false},
	} {
		if got := c.e.AwaitsSource(); got != c.want {
			t.Errorf("%+v: AwaitsSource %v, want %v", c.e, got, c.want)
		}
	}
}
