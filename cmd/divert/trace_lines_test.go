package main

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/internal/traceevent"
	"github.com/meshdivert/divert/policy"
)

// traceRecord is a record as the programs write it (bpf/trace.h): a, b as struct
// inet_addr holds them (network byte order words, IPv4 v4-mapped).
func traceRecord(t *testing.T, r bpf.DivertTraceEvent, src, dst netip.Addr) []byte {
	t.Helper()
	for i, a := range []netip.Addr{src, dst} {
		b, w := a.As16(), &r.Src.W
		if i == 1 {
			w = &r.Dst.W
		}
		for j := range w {
			w[j] = binary.NativeEndian.Uint32(b[4*j:])
		}
	}
	var out bytes.Buffer
	if err := binary.Write(&out, binary.NativeEndian, &r); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestTraceLines: what trace prints for a decision, in text and -o json, to the byte
// (scripts read both); a TCP connect's line has the source its socket got later.
func TestTraceLines(t *testing.T) {
	at := time.Date(2026, 12, 6, 15, 4, 5, 123e6, time.UTC)
	captured, passed := uint8(bpf.DivertTraceVerdictTRACE_CAPTURED), uint8(bpf.DivertTraceVerdictTRACE_PASSED)
	for _, c := range []struct {
		name         string
		rec          []byte
		connected    []byte // the record of its socket's source, if any
		pod, podName string
		text, json   string
	}{
		{name: "outbound tcp captured",
			rec: traceRecord(t, bpf.DivertTraceEvent{CgroupId: 77, Uid: 1000, Gid: 1000, DstPort: 80, ToPort: 15001, Reason: uint8(policy.ReasonIncludedCIDR),
				Verdict: captured, Protocol: 6, Cookie: 9}, netip.IPv4Unspecified(), netip.MustParseAddr("10.96.0.10")),
			connected: traceRecord(t, bpf.DivertTraceEvent{CgroupId: 77, SrcPort: 48312, Protocol: 6, Connected: 1, Cookie: 9},
				netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("10.96.0.10")),
			pod: "pod-a", podName: "default/web",
			text: "15:04:05.123 pod-a (default/web) outbound tcp 127.0.0.1:48312 -> 10.96.0.10:80 captured included-cidr -> 127.0.0.1:15001 uid 1000 gid 1000\n",
			json: `{"time":"2026-12-06T15:04:05.123Z","pod":"pod-a","podName":"default/web","direction":"outbound","protocol":"tcp","src":"127.0.0.1:48312","dst":"10.96.0.10:80","verdict":"captured","reason":"included-cidr","to":"127.0.0.1:15001","uid":1000,"gid":1000,"cgroupId":77}` + "\n"},
		{name: "outbound udp passed, ipv6, pod not known",
			rec: traceRecord(t, bpf.DivertTraceEvent{Uid: 1337, Gid: 1337, DstPort: 53, Reason: uint8(policy.ReasonProxyUID), Verdict: passed, Protocol: 17},
				netip.IPv6Unspecified(), netip.MustParseAddr("fd00::a")),
			text: "15:04:05.123 ? outbound udp [::]:0 -> [fd00::a]:53 passed proxy-uid uid 1337 gid 1337\n",
			json: `{"time":"2026-12-06T15:04:05.123Z","direction":"outbound","protocol":"udp","src":"[::]:0","dst":"[fd00::a]:53","verdict":"passed","reason":"proxy-uid","uid":1337,"gid":1337}` + "\n"},
		{name: "inbound captured",
			rec: traceRecord(t, bpf.DivertTraceEvent{Uid: ^uint32(0), Gid: ^uint32(0), SrcPort: 41234, DstPort: 8080, ToPort: 15006,
				Reason: uint8(policy.ReasonInboundIncludedPort), Verdict: captured, Protocol: 6, Inbound: 1},
				netip.MustParseAddr("10.244.0.9"), netip.MustParseAddr("10.244.0.5")),
			pod:  "pod-a",
			text: "15:04:05.123 pod-a inbound tcp 10.244.0.9:41234 -> 10.244.0.5:8080 captured inbound-included-port -> :15006\n",
			json: `{"time":"2026-12-06T15:04:05.123Z","pod":"pod-a","direction":"inbound","protocol":"tcp","src":"10.244.0.9:41234","dst":"10.244.0.5:8080","verdict":"captured","reason":"inbound-included-port","to":":15006"}` + "\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			rec, err := traceevent.Decode(c.rec)
			if err != nil {
				t.Fatal(err)
			}
			if rec.AwaitsSource() != (c.connected != nil) {
				t.Fatalf("%v: AwaitsSource %v", rec, rec.AwaitsSource())
			}
			ev := newTraceEvent(rec, at)
			if c.connected != nil {
				src, err := traceevent.Decode(c.connected)
				if err != nil || !src.Connected || src.Cookie != rec.Cookie {
					t.Fatalf("connected record %+v, %v", src, err)
				}
				ev.setSource(src)
			}
			ev.Pod, ev.PodName = c.pod, c.podName
			for _, asJSON := range []bool{false, true} {
				var b bytes.Buffer
				if err := printTraceEvent(&b, ev, asJSON); err != nil {
					t.Fatal(err)
				}
				want := c.text
				if asJSON {
					want = c.json
				}
				if b.String() != want {
					t.Errorf("printed\n  %q\nwant\n  %q", b.String(), want)
				}
			}
		})
	}
}
