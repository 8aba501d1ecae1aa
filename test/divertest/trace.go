package divertest

import (
	"errors"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/meshdivert/divert/internal/traceevent"
	"github.com/meshdivert/divert/loader"
)

// Tracer reads the decisions of the pods attached under one bpffs (what `divert trace`
// shows), for tests that must say which connections a counter counted.
type Tracer struct {
	t    *loader.Tracer
	rd   *ringbuf.Reader
	lost uint64
	rec  ringbuf.Record
}

// TraceEvent is one decision: one run of connect4/6, sendmsg or sk_lookup (an outbound
// TCP one with the source its socket got).
type TraceEvent = traceevent.Event

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
		e, err := traceevent.Decode(tr.rec.RawSample)
		if err != nil {
			tb.Fatal(err)
		}
		if e.Connected {
			if d := sockets[e.Cookie]; d != nil {
				d.Src = e.Src
			}
			continue
		}
		if e.AwaitsSource() {
			sockets[e.Cookie] = &e
		}
		out = append(out, &e)
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
