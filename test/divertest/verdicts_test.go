package divertest

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// TestJudge: the counting rule accepts every run of the one connection the model decided,
// and nothing else.
func TestJudge(t *testing.T) {
	in := func(src string, r policy.Reason) TraceEvent {
		return TraceEvent{Inbound: true, Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort("198.18.1.2:8080"), Reason: r}
	}
	out := func(cookie uint64, r policy.Reason) TraceEvent {
		return TraceEvent{Cookie: cookie, Src: netip.AddrPortFrom(netip.MustParseAddr("198.18.1.2"), 50000+uint16(cookie)),
			Dst: netip.MustParseAddrPort("198.19.1.1:80"), Reason: r}
	}
	// A segment of the pod's own connection (out(cookie, ...)) coming back to it.
	back := func(cookie uint64, r policy.Reason) TraceEvent {
		o := out(cookie, r)
		return TraceEvent{Inbound: true, Src: o.Dst, Dst: o.Src, Reason: r}
	}
	port, excl, incl, uid := policy.ReasonInboundIncludedPort, policy.ReasonInboundExcludedPort, policy.ReasonIncludedCIDR, policy.ReasonProxyUID
	a, b := "198.19.1.1:40000", "198.19.1.1:40001"
	counts := func(kv ...any) map[policy.Reason]uint64 {
		m := map[policy.Reason]uint64{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i].(policy.Reason)] = uint64(kv[i+1].(int))
		}
		return m
	}
	for _, c := range []struct {
		name     string
		want     []policy.Reason
		deltas   map[policy.Reason]uint64
		events   []TraceEvent
		checked  map[string]policy.Reason
		inbound  policy.Reason // the inbound rule's reason for any port (default port)
		problem  string        // "" when the rule accepts it
		repeated bool
	}{
		{name: "one run", want: []policy.Reason{port}, deltas: counts(port, 1), events: []TraceEvent{in(a, port)}},
		{name: "a SYN retransmitted after a drop", want: []policy.Reason{port}, deltas: counts(port, 2),
			events: []TraceEvent{in(a, port), in(a, port)}, repeated: true},
		{name: "nothing decided, nothing ran", deltas: counts()},
		{name: "a second connection", want: []policy.Reason{port}, deltas: counts(port, 2),
			events: []TraceEvent{in(a, port), in(b, port)}, problem: "not a decision wanted"},
		{name: "a wrong reason", want: []policy.Reason{port}, deltas: counts(excl, 1),
			events: []TraceEvent{in(a, excl)}, problem: "no connection decided inbound-included-port"},
		{name: "a run not counted", want: []policy.Reason{port}, deltas: counts(port, 1),
			events: []TraceEvent{in(a, port), in(a, port)}, problem: "counter inbound-included-port rose by 1 for 2 traced runs"},
		{name: "a count not traced", want: []policy.Reason{port}, deltas: counts(port, 2),
			events: []TraceEvent{in(a, port)}, problem: "rose by 2 for 1 traced runs"},
		{name: "no run", want: []policy.Reason{port}, deltas: counts(), problem: "no connection decided"},
		{name: "one connection, two reasons", want: []policy.Reason{port}, deltas: counts(port, 1, excl, 1),
			events: []TraceEvent{in(a, port), in(a, excl)}, problem: "decided twice, differently"},
		{name: "the client's and the proxy's upstream (TPROXY)", want: []policy.Reason{port, incl}, deltas: counts(port, 1, incl, 1),
			events: []TraceEvent{in(a, port), out(7, incl)}},
		{name: "two connects of one reason", want: []policy.Reason{incl}, deltas: counts(incl, 2),
			events: []TraceEvent{out(7, incl), out(8, incl)}, problem: "not a decision wanted"},
		{name: "a late run of an earlier scenario's connection", want: []policy.Reason{incl}, deltas: counts(incl, 1, port, 1),
			events: []TraceEvent{in(a, port), out(8, incl)}, checked: map[string]policy.Reason{in(a, port).Conn(): port}, repeated: true},
		// A late run in the moment between Begin's trace read and its counter read: traced
		// in this scenario, counted before it.
		{name: "a late run counted before the scenario began", want: []policy.Reason{incl}, deltas: counts(incl, 1),
			events: []TraceEvent{in(a, port), out(8, incl)}, checked: map[string]policy.Reason{in(a, port).Conn(): port}, repeated: true},
		{name: "a late run counted twice", want: []policy.Reason{incl}, deltas: counts(incl, 1, port, 2),
			events: []TraceEvent{in(a, port), out(8, incl)}, checked: map[string]policy.Reason{in(a, port).Conn(): port}, problem: "rose by 2 for 1 traced runs"},
		{name: "an earlier connection under another reason", want: []policy.Reason{incl}, deltas: counts(incl, 1, excl, 1),
			events: []TraceEvent{in(a, excl), out(8, incl)}, checked: map[string]policy.Reason{in(a, port).Conn(): port}, problem: "not a decision wanted"},
		{name: "an earlier connection's ports reused by a new one", want: []policy.Reason{excl}, deltas: counts(excl, 1),
			events: []TraceEvent{in(a, excl)}, checked: map[string]policy.Reason{in(a, port).Conn(): port}},
		// Seen here (seed 1796587679337489180): the proxy's connection to a remote passed,
		// the remote's TIME_WAIT re-acked a retransmitted FIN after the pod's socket was
		// gone, and sk_lookup decided that ACK under the rule for the pod's local port.
		{name: "a segment back to the pod's own connection after its socket", want: []policy.Reason{uid}, deltas: counts(uid, 1, port, 1),
			events: []TraceEvent{out(9, uid), back(9, port)}, repeated: true},
		{name: "a segment back to the pod's own connection under another rule", want: []policy.Reason{uid}, deltas: counts(uid, 1, port, 1),
			events: []TraceEvent{out(9, uid), back(9, port)}, inbound: excl, problem: "nor inbound-excluded-port as before"},
		{name: "a segment back to an earlier scenario's connection", want: []policy.Reason{incl}, deltas: counts(incl, 1, port, 1),
			events: []TraceEvent{back(9, port), out(10, incl)}, checked: map[string]policy.Reason{back(9, port).Conn(): StrayRun}, repeated: true},
		{name: "a segment to a connection the pod never made", want: []policy.Reason{incl}, deltas: counts(incl, 1, port, 1),
			events: []TraceEvent{back(9, port), out(10, incl)}, problem: "not a decision wanted"},
	} {
		t.Run(c.name, func(t *testing.T) {
			checked := c.checked
			if checked == nil {
				checked = map[string]policy.Reason{}
			}
			rule := c.inbound
			if rule == policy.ReasonNone {
				rule = port
			}
			j := Judge(c.want, Counts{maps.IPv4: c.deltas}, c.events, checked, func(netip.AddrPort) policy.Reason { return rule })
			got := strings.Join(j.Problems, "; ")
			if (c.problem == "") != (got == "") || !strings.Contains(got, c.problem) {
				t.Errorf("problems %q, want one with %q", got, c.problem)
			}
			if c.problem == "" && j.Repeated != c.repeated {
				t.Errorf("repeated %v, want %v", j.Repeated, c.repeated)
			}
		})
	}
}

// TestJudgeDecided: the rule hands back the first run of each connection it matched to a
// decision wanted, in the order they ran, and neither a repeated run nor a known one.
func TestJudgeDecided(t *testing.T) {
	pod := netip.MustParseAddrPort("198.18.1.2:8080")
	in := func(src string, r policy.Reason) TraceEvent {
		return TraceEvent{Inbound: true, Src: netip.MustParseAddrPort(src), Dst: pod, Reason: r}
	}
	port, excl := policy.ReasonInboundIncludedPort, policy.ReasonInboundExcludedPort
	a, b, old := in("198.19.1.1:40000", port), in("198.19.1.1:40001", excl), in("198.19.1.1:39999", port)
	checked := map[string]policy.Reason{old.Conn(): port}
	j := Judge([]policy.Reason{excl, port}, Counts{maps.IPv4: {port: 3, excl: 1}}, []TraceEvent{old, a, b, a}, checked,
		func(netip.AddrPort) policy.Reason { return port })
	if len(j.Problems) != 0 || !j.Repeated {
		t.Fatalf("problems %q, repeated %v; want none, repeated", j.Problems, j.Repeated)
	}
	if len(j.Decided) != 2 || j.Decided[0] != a || j.Decided[1] != b {
		t.Errorf("decided %v, want %v then %v", j.Decided, a, b)
	}
}

// TestJudgeFamilies: a run counts in its destination's family, a dual-stack socket's
// IPv4 (traced unmapped) in IPv4's; a count in the other family's counter breaks the rule.
func TestJudgeFamilies(t *testing.T) {
	in6 := TraceEvent{Inbound: true, Src: netip.MustParseAddrPort("[fd00::9]:40000"), Dst: netip.MustParseAddrPort("[fd00::5]:8080"),
		Reason: policy.ReasonInboundIncludedPort}
	out4 := TraceEvent{Cookie: 7, Src: netip.MustParseAddrPort("198.18.1.2:50000"), Dst: netip.MustParseAddrPort("198.19.1.1:80"),
		Reason: policy.ReasonIncludedCIDR}
	want := []policy.Reason{policy.ReasonInboundIncludedPort, policy.ReasonIncludedCIDR}
	inbound := func(netip.AddrPort) policy.Reason { return policy.ReasonInboundIncludedPort }
	right := Counts{maps.IPv6: {policy.ReasonInboundIncludedPort: 1}, maps.IPv4: {policy.ReasonIncludedCIDR: 1}}
	if j := Judge(want, right, []TraceEvent{in6, out4}, map[string]policy.Reason{}, inbound); len(j.Problems) != 0 {
		t.Errorf("each run counted in its family: problems %q", j.Problems)
	}
	wrong := Counts{maps.IPv4: {policy.ReasonInboundIncludedPort: 1, policy.ReasonIncludedCIDR: 1}}
	j := Judge(want, wrong, []TraceEvent{in6, out4}, map[string]policy.Reason{}, inbound)
	if got := strings.Join(j.Problems, "; "); !strings.Contains(got, "ipv4 counter inbound-included-port rose by 1 for 0 traced runs") ||
		!strings.Contains(got, "ipv6 counter inbound-included-port rose by 0 for 1 traced runs") {
		t.Errorf("an IPv6 run counted as IPv4: problems %q", got)
	}
}
