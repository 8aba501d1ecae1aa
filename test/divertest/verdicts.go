package divertest

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// VerdictCheck is the check that the eBPF programs decided what a test (or the parity
// model) says, each decision once per connection, and that the verdict counters counted
// exactly those runs, each family's its own: the one rule for every suite that reads exact counts (one owner).
//
// The counters count program runs, not connections: sk_lookup runs once per listener
// lookup, and the kernel looks a listener up again for one connection when it drops a SYN
// after the lookup (accept or SYN queue full) and the client retransmits it, for a
// syncookie's ACK, or for an ACK whose request socket's listener went away. iptables' nat
// counters count connections (conntrack sends a connection's first packet only). So the
// check reads divert trace's record of every run: each must be of a connection wanted,
// under its reason; each such connection must be there; and each counter must have risen
// by exactly its runs (of its address family), or by fewer by at most the runs of earlier
// scenarios' connections, which may be counted in the moment before the scenario's first
// counter read and traced after it. A repeated lookup of one connection is
// accepted, and logged with the kernel's TCP counters that explain it, and so is a late
// one of an earlier scenario's connection, and a segment coming back to one of the pod's
// own connections after its socket is gone (StrayRun); a second connection, a wrong
// reason or a run not counted (or counted and not traced) fails (docs/semantics.md,
// "What the verdict counters count").
type VerdictCheck struct {
	att    *Attached
	trace  *Tracer
	before Counts
	// The TCP counters of the pod's network namespace and of its network's (the remote
	// end: the client of inbound connections, the server of outbound ones).
	PodStats, NetStats TCPStats
	// checked are the connections earlier scenarios decided, by reason: a late lookup of
	// one (a segment that found its socket gone) is its run, not this scenario's.
	checked map[string]policy.Reason
	cfg     *policy.Config // the scenario's
}

// NewVerdictCheck starts tracing att's bpffs for the rest of the test.
func NewVerdictCheck(t *testing.T, att *Attached) *VerdictCheck {
	return &VerdictCheck{att: att, trace: Trace(t, att.Opts), checked: map[string]policy.Reason{}}
}

// Begin starts a scenario under cfg: what the programs decided so far is not its business.
func (vc *VerdictCheck) Begin(t *testing.T, cfg *policy.Config) {
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
	vc.before = vc.att.counts(t)
	vc.PodStats = ReadTCPStats(t, vc.att.Pod.NetNSPath)
	vc.NetStats = ReadTCPStats(t, vc.att.Pod.Net.NetNSPath)
}

// Check ends a scenario whose connections must be decided want (one reason per
// connection), as the rule above says; what says which scenario, for the messages. It
// returns the first run of each connection decided one of want, in the order they ran,
// for a test to say which connections those are.
func (vc *VerdictCheck) Check(t *testing.T, want []policy.Reason, what string) []TraceEvent {
	t.Helper()
	deltas, events := vc.Collect(t)
	j := Judge(want, deltas, events, vc.checked, vc.Inbound)
	if len(j.Problems) == 0 && !j.Repeated {
		return j.Decided
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: wanted %v; the programs ran %d times:\n", what, want, len(events))
	for _, e := range events {
		fmt.Fprintf(&b, "    %s (%s)\n", e, e.Conn())
	}
	fmt.Fprintf(&b, "  TCP counters that changed, pod: %s\n", ReadTCPStats(t, vc.att.Pod.NetNSPath).Since(vc.PodStats))
	fmt.Fprintf(&b, "  TCP counters that changed, network (remote end): %s", ReadTCPStats(t, vc.att.Pod.Net.NetNSPath).Since(vc.NetStats))
	if len(j.Problems) == 0 {
		// Exact, and explained: the kernel looked a listener up more than once for one
		// connection (see the counters: a SYN retransmitted after a drop, a syncookie).
		t.Logf("a connection decided more than once (accepted: the same connection, the same reason)\n%s", b.String())
		return j.Decided
	}
	t.Errorf("%s\n  %s", strings.Join(j.Problems, "\n  "), b.String())
	return j.Decided
}

// Inbound is the scenario's reason for a segment from outside to the pod's dst.
func (vc *VerdictCheck) Inbound(dst netip.AddrPort) policy.Reason {
	return vc.cfg.Decide(policy.Conn{Direction: policy.Inbound, Dst: dst, DstLocal: true}).Reason
}

// Collect reads how much each counter rose since Begin, and the runs traced since.
func (vc *VerdictCheck) Collect(t *testing.T) (Counts, []TraceEvent) {
	t.Helper()
	after := vc.att.counts(t)
	deltas := Counts{}
	for _, f := range families {
		deltas[f] = map[policy.Reason]uint64{}
		for _, r := range policy.Reasons() {
			deltas[f][r] = after[f][r] - vc.before[f][r]
		}
	}
	// A program counts, then traces: a run counted may be a few µs from its record. The
	// counters are read first, so every run they counted is traced by now or very soon:
	// "soon" is long in a TCG guest, whose other vCPU (running a segment's sk_lookup in
	// softirq) the host may not schedule for a second or more. Waiting costs nothing when
	// every record is there.
	events := vc.trace.Take(t)
	for deadline := time.Now().Add(traceCatchUp); !tracedAll(deltas, events) && time.Now().Before(deadline); {
		time.Sleep(2 * time.Millisecond)
		events = append(events, vc.trace.Take(t)...)
	}
	return deltas, events
}

// tracedAll reports whether events hold a run for every one counted in deltas.
func tracedAll(deltas Counts, events []TraceEvent) bool {
	runs := runsOf(events)
	for _, f := range families {
		for r, n := range deltas[f] {
			if runs[f][r] < n {
				return false
			}
		}
	}
	return true
}

// runsOf counts events by family and reason.
func runsOf(events []TraceEvent) Counts {
	runs := Counts{maps.IPv4: {}, maps.IPv6: {}}
	for _, e := range events {
		runs[family(e)][e.Reason]++
	}
	return runs
}

// traceCatchUp bounds the wait for the trace records of runs already counted.
const traceCatchUp = 5 * time.Second

// Counts are verdict counters (or runs), by address family and reason.
type Counts map[maps.Family]map[policy.Reason]uint64

var families = []maps.Family{maps.IPv4, maps.IPv6}

// counts reads the pod's verdict counters, both families at once.
func (a *Attached) counts(tb testing.TB) Counts {
	tb.Helper()
	m, err := loader.OpenMaps(a.Pod.Name, a.Opts)
	if err != nil {
		tb.Fatal(err)
	}
	defer loader.CloseMaps(m)
	c, err := maps.CountersByFamily(m)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// family is the counter family of e: a dual-stack socket's ::ffff:a.b.c.d is IPv4 on the
// wire, and counted so (the trace shows it unmapped).
func family(e TraceEvent) maps.Family {
	if e.Dst.Addr().Is4() {
		return maps.IPv4
	}
	return maps.IPv6
}

// StrayRun marks, in the connections checked, the segments that come back to one of the
// pod's own connections: one that arrives after the connection's socket is gone (a peer in
// TIME_WAIT re-acking a retransmitted FIN) finds no socket, and sk_lookup decides it as
// any segment to that local port, under the inbound rule for the port at that moment.
// iptables does not count it: conntrack still knows the connection.
const StrayRun = policy.NumReasons + 1

// remember notes, for an outbound TCP run, the segments that may come back to its
// connection (StrayRun).
func remember(checked map[string]policy.Reason, e TraceEvent) {
	if !e.Inbound && !e.UDP && e.Src.Port() != 0 {
		checked[TraceEvent{Inbound: true, Src: e.Dst, Dst: e.Src}.Conn()] = StrayRun
	}
}

// Judgement is what Judge found.
type Judgement struct {
	Problems []string     // what breaks the rule
	Repeated bool         // a connection ran more than once (accepted, worth a word)
	Decided  []TraceEvent // the first run of each connection decided one of want
}

// Judge applies the rule to one scenario: want is the decisions wanted (a reason per
// connection), deltas how much each counter of each family rose, events the runs traced,
// checked the connections of earlier scenarios (this one's are added), inbound the reason
// for a segment to one of the pod's ports.
func Judge(want []policy.Reason, deltas Counts, events []TraceEvent,
	checked map[string]policy.Reason, inbound func(dst netip.AddrPort) policy.Reason) (j Judgement) {
	runs := runsOf(events)
	// late are the runs of connections earlier scenarios made, which may fall on either side
	// of a scenario's first counter read (Begin takes the trace, then reads the counters):
	// traced here, they may be counted in the reading before.
	late := Counts{maps.IPv4: {}, maps.IPv6: {}}
	var conns []string // in order of their first run
	byConn := map[string][]TraceEvent{}
	for _, e := range events {
		if _, ok := byConn[e.Conn()]; !ok {
			conns = append(conns, e.Conn())
		}
		byConn[e.Conn()] = append(byConn[e.Conn()], e)
		remember(checked, e)
	}
	unmatched := slices.Clone(want)
	decided := map[string]bool{}
	// An earlier connection's key may come again as a new connection (a reused port):
	// the decisions wanted go to new connections first, then to known ones.
	var known []string
	for _, c := range conns {
		es := byConn[c]
		r := es[0].Reason
		if i := slices.IndexFunc(es, func(e TraceEvent) bool { return e.Reason != r }); i >= 0 {
			j.Problems = append(j.Problems, fmt.Sprintf("%s decided twice, differently: %s, then %s", c, r, es[i].Reason))
			continue
		}
		if _, ok := checked[c]; ok {
			known = append(known, c)
			continue
		}
		i := slices.Index(unmatched, r)
		if i < 0 {
			j.Problems = append(j.Problems, fmt.Sprintf("%s decided %s (%d runs): not a decision wanted", c, r, len(es)))
			continue
		}
		unmatched = slices.Delete(unmatched, i, i+1)
		j.Repeated = j.Repeated || len(es) > 1
		checked[c], decided[c] = r, true
	}
	for _, c := range known {
		es := byConn[c]
		r, earlier := es[0].Reason, checked[c]
		if earlier == StrayRun {
			earlier = inbound(es[0].Dst)
		}
		if r == earlier {
			j.Repeated = true // a segment of a known connection, looked up again
			for _, e := range es {
				late[family(e)][e.Reason]++
			}
			continue
		}
		if i := slices.Index(unmatched, r); i >= 0 {
			unmatched = slices.Delete(unmatched, i, i+1)
			j.Repeated = j.Repeated || len(es) > 1
			checked[c], decided[c] = r, true
			continue
		}
		j.Problems = append(j.Problems, fmt.Sprintf("%s decided %s (%d runs): not a decision wanted, nor %s as before", c, r, len(es), earlier))
	}
	for _, r := range unmatched {
		j.Problems = append(j.Problems, fmt.Sprintf("no connection decided %s", r))
	}
	for _, f := range families {
		for _, r := range policy.Reasons() {
			d, n := deltas[f][r], runs[f][r]
			switch {
			case d > n || d+late[f][r] < n:
				j.Problems = append(j.Problems, fmt.Sprintf("%s counter %s rose by %d for %d traced runs", f, r, d, n))
			case d < n:
				j.Repeated = true // late runs counted before the scenario began
			}
		}
	}
	for _, c := range conns {
		if decided[c] {
			j.Decided = append(j.Decided, byConn[c][0])
		}
	}
	return j
}
