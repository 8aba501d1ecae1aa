package bench

import (
	"encoding/json"
	"net/netip"
	"testing"
	"time"

	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// B7's resolver must tell an answer from the agent stand-in from one that took another
// path, or the benchmark could time a query that escaped capture: asked directly, the
// nameserver outside the pod answers with its own marker and every query is on the wrong
// path; with DNS capture the same query is the stand-in's, from the nameserver's address.
func TestDNSQueryChecksTheAnswer(t *testing.T) {
	n := testpod.NewNetwork(t)
	ns := netip.AddrPortFrom(n.Addrs[3], policy.DNSPort)
	n.Start(t, testpod.ProcSpec{Args: dnsArgs(ns, markerServer)}).WaitReady(t)
	pod := n.AddPod(t)
	pod.Start(t, testpod.ProcSpec{UID: proxyUID, GID: proxyUID,
		Args: dnsArgs(agentDNS, markerAgent)}).WaitReady(t)
	ask := func(t *testing.T, proto string, dst netip.AddrPort, args ...string) LoadResult {
		t.Helper()
		out := pod.Start(t, testpod.ProcSpec{UID: appUID, GID: appUID,
			Args: append([]string{cmdDNSQuery, "--proto", proto, "--dst", dst.String()}, args...)}).Wait(t, time.Minute)
		var res LoadResult
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("bench-dnsq printed %q: %v", out, err)
		}
		if res.Errors > 0 {
			t.Fatalf("%s %s: %d errors (first: %s)", proto, dst, res.Errors, res.FirstErr)
		}
		return res
	}
	seq := []string{"--n", "5", "--warmup", "1"}
	check := func(t *testing.T, dst netip.AddrPort, wantWrong int) {
		t.Helper()
		for _, proto := range []string{"udp", "tcp"} {
			if res := ask(t, proto, dst, seq...); res.Conns != 6 || res.Count != 5 || res.WrongPath != wantWrong {
				t.Errorf("%s to %s: %d queries, %d measured, %d on the wrong path; want 6, 5, %d",
					proto, dst, res.Conns, res.Count, res.WrongPath, wantWrong)
			}
		}
	}
	t.Run("no capture", func(t *testing.T) {
		check(t, agentDNS, 0)
		check(t, ns, 6) // the nameserver answered: its marker
	})
	t.Run("ebpf", func(t *testing.T) {
		cfg := divertest.Config(t, "--redirect-dns", "--dns-servers", ns.Addr().String())
		a := divertest.Attach(t, pod, divertest.BPFFS(t), cfg)
		check(t, ns, 0)
		if got := a.Counters(t)[policy.ReasonDNSCaptured]; got != 12 {
			t.Errorf("dns-captured = %d, want 12", got)
		}
		res := ask(t, "udp", ns, "--clients", "2", "--warmup", "2", "--duration", "50ms")
		if res.WrongPath != 0 || res.Count == 0 || res.Seconds <= 0 {
			t.Errorf("parallel: %+v", res)
		}
	})
}
