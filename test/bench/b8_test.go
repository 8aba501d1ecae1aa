package bench

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/loader"
)

// benchTracer is divert trace without its printing: tracing on, and a reader draining the
// node's ring buffer and decoding every decision, as divert trace does.
type benchTracer struct {
	t        *loader.Tracer
	rd       *ringbuf.Reader
	done     chan struct{}
	mu       sync.Mutex
	captured uint64
}

func startBenchTracer(s *scope, opts loader.Options) *benchTracer {
	t, err := loader.StartTrace(opts, nil)
	if err != nil {
		s.Fatalf("B8: start tracing: %v", err)
	}
	rd, err := ringbuf.NewReader(t.Events)
	if err != nil {
		t.Close()
		s.Fatalf("B8: read the ring buffer: %v", err)
	}
	bt := &benchTracer{t: t, rd: rd, done: make(chan struct{})}
	go func() {
		defer close(bt.done)
		var rec ringbuf.Record
		for {
			rd.SetDeadline(time.Now().Add(100 * time.Millisecond)) // as divert trace polls
			if err := rd.ReadInto(&rec); err != nil {
				if errors.Is(err, os.ErrClosed) || errors.Is(err, ringbuf.ErrClosed) {
					return
				}
				continue
			}
			var ev bpf.DivertTraceEvent
			if binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev) == nil &&
				ev.Verdict == uint8(bpf.DivertTraceVerdictTRACE_CAPTURED) {
				bt.mu.Lock()
				bt.captured++
				bt.mu.Unlock()
			}
		}
	}()
	return bt
}

// stop turns tracing off and returns the decisions to capture it read and those the
// ring buffer had no room for.
func (bt *benchTracer) stop(s *scope) (captured, lost uint64) {
	time.Sleep(250 * time.Millisecond) // two of the reader's polls: it has read every record
	lost, err := bt.t.Lost()
	if err != nil {
		s.Fatalf("B8: read lost records: %v", err)
	}
	bt.rd.Close()
	<-bt.done
	if err := bt.t.Close(); err != nil {
		s.Fatalf("B8: stop tracing: %v", err)
	}
	bt.mu.Lock()
	defer bt.mu.Unlock()
	return bt.captured, lost
}

// b8: what divert trace costs. B1's sequential connections and B2's connection rate on an
// eBPF pod with tracing off (ebpf) and on with a reader (ebpf-trace), a fresh pod per
// state and round, the states alternating which goes first. With tracing on, every
// connection the app made must have reached the reader, or been counted lost.
func (r *rig) b8() {
	s := newScope(r.b)
	defer s.Close()
	n := newNetwork(s)
	cfg := defaultConfig()
	for round := range r.p.Rounds {
		func() {
			rs := newScope(s)
			defer rs.Close()
			var pods []*modePod
			for _, m := range []Mode{EBPF, EBPFTrace} {
				mp, err := r.addPod(rs, n, EBPF, cfg)
				if err != nil {
					rs.Fatalf("B8: %v", err)
				}
				mp.mode = m
				pods = append(pods, mp)
			}
			for _, mp := range rotate(pods, round) {
				var bt *benchTracer
				ctr := r.redirects(rs, mp)
				if mp.mode == EBPFTrace {
					bt = startBenchTracer(rs, r.opts)
				}
				r.connRound(rs, B8, 0, mp, round, r.p.B1Conns, r.p.B1Warmup)
				res := r.load(rs, mp, "--kind", "rate", "--clients", strconv.Itoa(r.p.B2Clients),
					"--duration", r.p.B2Duration.String())
				r.res.Add(B8, ConnRate, 0, mp.mode, round, float64(res.Count)/res.Seconds)
				redirected := r.redirects(rs, mp) - ctr
				if redirected != uint64(mp.conns) {
					rs.Fatalf("B8 %s: the kernel redirected %d connections, the app made %d", mp.mode, redirected, mp.conns)
				}
				if bt != nil {
					captured, lost := bt.stop(rs)
					if captured+lost != redirected {
						rs.Fatalf("B8: the reader saw %d captured connections and %d were lost, the kernel redirected %d", captured, lost, redirected)
					}
					r.res.Add(B8, TraceLost, 0, mp.mode, round, 100*float64(lost)/float64(redirected))
				}
			}
		}()
	}
	for _, m := range []Mode{EBPF, EBPFTrace} {
		r.logf("  B8 %-16s p50 %s µs, %s conn/s", m, Summarize(r.res.Values(B8, P50, 0, m)), Summarize(r.res.Values(B8, ConnRate, 0, m)))
	}
}
