package parity

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
)

// verdictCheck is the eBPF backend's check that its programs decided what the model did,
// each decision once per connection: the one rule for every suite (one owner), kept per
// world.
//
// The counters count program runs, not connections: sk_lookup runs once per listener
// lookup, and the kernel looks a listener up again for one connection when it drops a SYN
// after the lookup (accept or SYN queue full) and the client retransmits it, for a
// syncookie's ACK, or for an ACK whose request socket's listener went away. iptables' nat
// counters count connections (conntrack sends a connection's first packet only). So the
// check reads divert trace's record of every run: each must be of a connection the model
// decided, under its reason; each such connection must be there; and each counter must
// have risen by exactly its runs. A repeated lookup of one connection is accepted, and
// logged with the kernel's TCP counters that explain it, and so is a late one of an
// earlier scenario's connection, and a segment coming back to one of the pod's own
// connections after its socket is gone (strayRun); a second connection, a wrong reason or
// a run not counted (or counted and not traced) fails.
type verdictCheck struct {
	att    *divertest.Attached
	trace  *divertest.Tracer
	before map[policy.Reason]uint64
	// The TCP counters of the pod's network namespace and of its network's (the remote
	// end: the client of inbound connections, the server of outbound ones).
	podStats, netStats divertest.TCPStats
	// checked are the connections earlier scenarios decided, by reason: a late lookup of
	// one (a segment that found its socket gone) is its run, not this scenario's.
	checked map[string]policy.Reason
	cfg     *policy.Config // the scenario's
}

func newVerdictCheck(t *testing.T, att *divertest.Attached) *verdictCheck {
	return &verdictCheck{att: att, trace: divertest.Trace(t, att.Opts), checked: map[string]policy.Reason{}}
}

// begin starts a scenario under cfg: what the programs decided so far is not its business.
func (vc *verdictCheck) begin(t *testing.T, cfg *policy.Config) {
	t.Helper()
	vc.cfg = cfg
	// Connections made outside a scenario (a TFO cookie's first connect) may still be
	// looked up later: known, not counted here.
	for _, e := range vc.trace.Take(t) {
		remember(vc.checked, e)
		if _, ok := vc.checked[e.Conn()]; !ok {
			vc.checked[e.Conn()] = e.Reason
		}
	}
	vc.before = vc.att.Counters(t)
	vc.podStats = divertest.ReadTCPStats(t, vc.att.Pod.NetNSPath)
	vc.netStats = divertest.ReadTCPStats(t, vc.att.Pod.Net.NetNSPath)
}

// decisionsOf is what the programs must decide for a connection the model gave v: one
// decision under its reason, or none where no program decides (ReasonNone: no rule, as
// IPv6 where istio writes no IPv6 rules; noVerdict: the kernel refused it first).
func decisionsOf(v policy.Verdict) []policy.Reason {
	if v.Reason == policy.ReasonNone || v.Reason >= policy.NumReasons {
		return nil
	}
	return []policy.Reason{v.Reason}
}

// check ends a scenario whose connections the model decided want (one reason per
// connection), as the rule above says; what says which scenario, for the messages.
func (vc *verdictCheck) check(t *testing.T, want []policy.Reason, what string) {
	t.Helper()
	deltas, events := vc.collect(t)
	problems, repeated := judge(want, deltas, events, vc.checked, vc.inbound)
	if len(problems) == 0 && !repeated {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: the model decided %v; the programs ran %d times:\n", what, want, len(events))
	for _, e := range events {
		fmt.Fprintf(&b, "    %s\n", e)
	}
	fmt.Fprintf(&b, "  TCP counters that changed, pod: %s\n", divertest.ReadTCPStats(t, vc.att.Pod.NetNSPath).Since(vc.podStats))
	fmt.Fprintf(&b, "  TCP counters that changed, network (remote end): %s", divertest.ReadTCPStats(t, vc.att.Pod.Net.NetNSPath).Since(vc.netStats))
	if len(problems) == 0 {
		// Exact, and explained: the kernel looked a listener up more than once for one
		// connection (see the counters: a SYN retransmitted after a drop, a syncookie).
		t.Logf("a connection decided more than once (accepted: the same connection, the same reason)\n%s", b.String())
		return
	}
	t.Errorf("%s\n  %s", strings.Join(problems, "\n  "), b.String())
}

// inbound is the model's reason for a segment from outside to the pod's dst.
func (vc *verdictCheck) inbound(dst netip.AddrPort) policy.Reason {
	return vc.cfg.Decide(policy.Conn{Direction: policy.Inbound, Dst: dst, DstLocal: true}).Reason
}

// collect reads how much each counter rose since begin, and the runs traced since.
func (vc *verdictCheck) collect(t *testing.T) (map[policy.Reason]uint64, []divertest.TraceEvent) {
	t.Helper()
	after := vc.att.Counters(t)
	deltas := map[policy.Reason]uint64{}
	var counted uint64
	for _, r := range policy.Reasons() {
		deltas[r] = after[r] - vc.before[r]
		counted += deltas[r]
	}
	// A program counts, then traces: a run counted may be a few µs from its record. The
	// counters are read first, so every run they counted is traced by now or very soon.
	events := vc.trace.Take(t)
	for deadline := time.Now().Add(200 * time.Millisecond); uint64(len(events)) < counted && time.Now().Before(deadline); {
		time.Sleep(2 * time.Millisecond)
		events = append(events, vc.trace.Take(t)...)
	}
	return deltas, events
}

// strayRun marks, in verdictCheck.checked, the segments that come back to one of the
// pod's own connections: one that arrives after the connection's socket is gone (a peer in
// TIME_WAIT re-acking a retransmitted FIN) finds no socket, and sk_lookup decides it as
// any segment to that local port, under the inbound rule for the port at that moment.
// iptables does not count it: conntrack still knows the connection.
const strayRun = policy.NumReasons + 1

// remember notes, for an outbound TCP run, the segments that may come back to its
// connection (strayRun).
func remember(checked map[string]policy.Reason, e divertest.TraceEvent) {
	if !e.Inbound && !e.UDP && e.Src.Port() != 0 {
		checked[divertest.TraceEvent{Inbound: true, Src: e.Dst, Dst: e.Src}.Conn()] = strayRun
	}
}

// judge applies the rule to one scenario: want is the model's decisions (a reason per
// connection), deltas how much each counter rose, events the runs traced, checked the
// connections of earlier scenarios (this one's are added), inbound the model's reason for
// a segment to one of the pod's ports. It returns what breaks the rule, and whether a
// connection ran more than once (accepted, worth a word).
func judge(want []policy.Reason, deltas map[policy.Reason]uint64, events []divertest.TraceEvent,
	checked map[string]policy.Reason, inbound func(dst netip.AddrPort) policy.Reason) (problems []string, repeated bool) {
	runs := map[policy.Reason]uint64{}
	var conns []string // in order of their first run
	byConn := map[string][]divertest.TraceEvent{}
	for _, e := range events {
		runs[e.Reason]++
		if _, ok := byConn[e.Conn()]; !ok {
			conns = append(conns, e.Conn())
		}
		byConn[e.Conn()] = append(byConn[e.Conn()], e)
		remember(checked, e)
	}
	unmatched := slices.Clone(want)
	// An earlier connection's key may come again as a new connection (a reused port):
	// the model's decisions go to new connections first, then to known ones.
	var known []string
	for _, c := range conns {
		es := byConn[c]
		r := es[0].Reason
		if i := slices.IndexFunc(es, func(e divertest.TraceEvent) bool { return e.Reason != r }); i >= 0 {
			problems = append(problems, fmt.Sprintf("%s decided twice, differently: %s, then %s", c, r, es[i].Reason))
			continue
		}
		if _, ok := checked[c]; ok {
			known = append(known, c)
			continue
		}
		i := slices.Index(unmatched, r)
		if i < 0 {
			problems = append(problems, fmt.Sprintf("%s decided %s (%d runs): not a decision of the model's", c, r, len(es)))
			continue
		}
		unmatched = slices.Delete(unmatched, i, i+1)
		repeated = repeated || len(es) > 1
		checked[c] = r
	}
	for _, c := range known {
		es := byConn[c]
		r, earlier := es[0].Reason, checked[c]
		if earlier == strayRun {
			earlier = inbound(es[0].Dst)
		}
		if r == earlier {
			repeated = true // a segment of a known connection, looked up again
			continue
		}
		if i := slices.Index(unmatched, r); i >= 0 {
			unmatched = slices.Delete(unmatched, i, i+1)
			repeated = repeated || len(es) > 1
			checked[c] = r
			continue
		}
		problems = append(problems, fmt.Sprintf("%s decided %s (%d runs): not a decision of the model's, nor %s as before", c, r, len(es), earlier))
	}
	for _, r := range unmatched {
		problems = append(problems, fmt.Sprintf("no connection decided %s", r))
	}
	for _, r := range policy.Reasons() {
		if deltas[r] != runs[r] {
			problems = append(problems, fmt.Sprintf("counter %s rose by %d for %d traced runs", r, deltas[r], runs[r]))
		}
	}
	return problems, repeated
}
