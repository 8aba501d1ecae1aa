package divertest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// Tracer reads the decisions of the pods attached under one bpffs (what `divert trace`
// shows), for tests that must say which connections a counter counted.
type Tracer struct {
	t    *loader.Tracer
	rd   *ringbuf.Reader
	lost uint64
	rec  ringbuf.Record
}

// TraceEvent is one decision: one run of connect4/6, sendmsg or sk_lookup.
type TraceEvent struct {
	Inbound  bool
	UDP      bool
	Src, Dst netip.AddrPort // Src: the socket's (outbound: joined from its connect record)
	Verdict  bpf.DivertTraceVerdict
	Reason   policy.Reason
	ToPort   uint16
	UID, GID uint32
	Cookie   uint64 // outbound: the socket's
}

// Conn identifies the connection a decision is of: the socket for the pod's own (a
// socket connects once; its datagrams share it), the 4-tuple for inbound (each SYN of
// one connection runs sk_lookup with the same one).
func (e TraceEvent) Conn() string {
	if e.Inbound {
		return fmt.Sprintf("inbound %s -> %s", e.Src, e.Dst)
	}
	return fmt.Sprintf("outbound socket %#x", e.Cookie)
}

func (e TraceEvent) String() string {
	dir, proto := "outbound", "tcp"
	if e.Inbound {
		dir = "inbound"
	}
	if e.UDP {
		proto = "udp"
	}
	verdict := map[bpf.DivertTraceVerdict]string{bpf.DivertTraceVerdictTRACE_PASSED: "passed",
		bpf.DivertTraceVerdictTRACE_CAPTURED: "captured", bpf.DivertTraceVerdictTRACE_DROPPED: "dropped"}[e.Verdict]
	s := fmt.Sprintf("%s %s %s -> %s %s %s", dir, proto, e.Src, e.Dst, verdict, e.Reason)
	if e.ToPort != 0 {
		s += fmt.Sprintf(" -> :%d", e.ToPort)
	}
	if !e.Inbound {
		s += fmt.Sprintf(" uid %d gid %d socket %#x", e.UID, e.GID, e.Cookie)
	}
	return s
}

// Trace turns tracing on for the bpffs of opts until the end of the test.
func Trace(tb testing.TB, opts loader.Options) *Tracer {
	tb.Helper()
	lt, err := loader.StartTrace(opts, nil)
	if err != nil {
		tb.Fatalf("start trace: %v", err)
	}
	rd, err := ringbuf.NewReader(lt.Events)
	if err != nil {
		lt.Close()
		tb.Fatalf("read the trace ring buffer: %v", err)
	}
	tb.Cleanup(func() {
		rd.Close()
		if err := lt.Close(); err != nil {
			tb.Errorf("stop trace: %v", err)
		}
	})
	return &Tracer{t: lt, rd: rd}
}

// Take returns the decisions written so far and not taken yet, reading what the ring
// holds without waiting (the programs do not wake readers). An outbound TCP decision
// gets its source from the record its socket writes once connected, before its SYN
// leaves (bpf/trace.h), so in the same Take when the connect has returned.
func (tr *Tracer) Take(tb testing.TB) []TraceEvent {
	tb.Helper()
	var out []*TraceEvent
	sockets := map[uint64]*TraceEvent{} // outbound TCP decisions, by socket
	tr.rd.SetDeadline(time.Now())
	for {
		err := tr.rd.ReadInto(&tr.rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			tb.Fatalf("read the trace ring buffer: %v", err)
		}
		var r bpf.DivertTraceEvent
		if err := binary.Read(bytes.NewReader(tr.rec.RawSample), binary.NativeEndian, &r); err != nil {
			tb.Fatalf("decode a trace record of %d bytes: %v", len(tr.rec.RawSample), err)
		}
		if r.Connected != 0 {
			if e := sockets[r.Cookie]; e != nil {
				e.Src = netip.AddrPortFrom(inetAddr(r.Src.W), r.SrcPort)
			}
			continue
		}
		e := &TraceEvent{Inbound: r.Inbound != 0, UDP: r.Protocol == 17,
			Src: netip.AddrPortFrom(inetAddr(r.Src.W), r.SrcPort), Dst: netip.AddrPortFrom(inetAddr(r.Dst.W), r.DstPort),
			Verdict: bpf.DivertTraceVerdict(r.Verdict), Reason: policy.Reason(r.Reason), ToPort: r.ToPort,
			UID: r.Uid, GID: r.Gid, Cookie: r.Cookie}
		if !e.Inbound && !e.UDP {
			sockets[e.Cookie] = e
		}
		out = append(out, e)
	}
	lost, err := tr.t.Lost()
	if err != nil {
		tb.Fatalf("read the trace's lost count: %v", err)
	}
	if lost != tr.lost {
		tb.Errorf("trace: %d decisions lost (ring buffer full): the trace of this test is incomplete", lost-tr.lost)
		tr.lost = lost
	}
	events := make([]TraceEvent, len(out))
	for i, e := range out {
		events[i] = *e
	}
	return events
}

// inetAddr reads struct inet_addr (network byte order words, IPv4 as ::ffff:a.b.c.d), as
// cmd/divert's trace does.
func inetAddr(w [4]uint32) netip.Addr {
	var b [16]byte
	for i, x := range w {
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(x), byte(x>>8), byte(x>>16), byte(x>>24)
	}
	return netip.AddrFrom16(b).Unmap()
}
