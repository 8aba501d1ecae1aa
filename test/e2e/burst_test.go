package e2e

import (
	"flag"
	"net/netip"
	"testing"

	"github.com/meshdivert/divert/internal/divertest"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testpod"
)

// 8,000 is twice the old 4,096-entry table that lost original destinations under a burst,
// and fits the machines' RLIMIT_NOFILE of 20,000 (one socket per process and side).
var burstConns = flag.Int("burst.conns", 8000, "connections in TestBurstKeepsEveryOriginalDestination")

// An app opens many connections at once to as many destinations while its proxy is slow
// to accept: every connection waits, established, in the proxy's accept queue. Each one
// must reach the proxy with its own original destination, however many wait.
func TestBurstKeepsEveryOriginalDestination(t *testing.T) {
	n := *burstConns
	t.Run("ebpf", func(t *testing.T) {
		pod := testpod.New(t)
		att := divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
		res := pod.Burst(t, netip.AddrPortFrom(anyAddr, 15001), proxyUID, appUID, n)
		lost := 0
		for _, c := range res.Conns {
			if c.Err != "" || c.Orig != c.Target.String() {
				if lost++; lost <= 5 {
					t.Errorf("connection to %s: app %q err %q, proxy read %q (err %q)", c.Target, c.Local, c.Err, c.Orig, c.OrigErr)
				}
			}
		}
		if lost > 0 || len(res.Accepts) != n || len(res.Unmatched) != 0 {
			t.Fatalf("%d of %d connections did not reach the proxy with their own original destination; proxy accepted %d, %d unmatched",
				lost, n, len(res.Accepts), len(res.Unmatched))
		}
		if got := att.Counters(t)[policy.ReasonIncludedCIDR]; got != uint64(n) {
			t.Errorf("included-cidr counted %d, want %d", got, n)
		}
		att.NoDrops(t)
	})
	// The reference: under istio's rules a connection may fail to establish (REDIRECT's
	// source-port collisions), and NAT may rewrite its source port so the proxy's peer is
	// not the app's local address; every established one must still reach the proxy once,
	// with its own original destination.
	t.Run("iptables", func(t *testing.T) {
		pod := testpod.New(t)
		modes[1].attach(t, pod)
		res := pod.Burst(t, netip.AddrPortFrom(anyAddr, 15001), proxyUID, appUID, n)
		established := make(map[string]bool, n)
		for _, c := range res.Conns {
			if c.Err == "" {
				established[c.Target.String()] = true
			}
		}
		seen := make(map[string]bool, n)
		for _, a := range res.Accepts {
			if !established[a.Orig] || seen[a.Orig] {
				t.Errorf("proxy read %q (err %q) from %s: not one established connection's destination", a.Orig, a.OrigErr, a.Peer)
			}
			seen[a.Orig] = true
		}
		t.Logf("iptables: %d of %d established, proxy accepted %d (%d with a NAT-rewritten source port)",
			len(established), n, len(res.Accepts), len(res.Unmatched))
		if len(seen) != len(established) {
			t.Fatalf("proxy got %d distinct original destinations, %d connections were established", len(seen), len(established))
		}
	})
}
