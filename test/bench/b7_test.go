package bench

import (
	"context"
	"encoding/json"
	"net/netip"
	"strconv"
	"time"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// agentDNS is where istio-agent serves DNS, and where the stand-in listens.
var agentDNS = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), policy.DNSAgentPort)

// dnsModes are B7's modes: explicit is the app asking the stand-in itself (no capture).
func dnsModes() []Mode {
	var out []Mode
	for _, m := range AllModes {
		if m == Explicit || m == EBPF || m == NFT || m == Legacy {
			out = append(out, m)
		}
	}
	return out
}

// dnsPod is one mode's pod for B7: DNS capture installed (but for explicit) and the agent
// stand-in running in it as the proxy uid.
type dnsPod struct {
	mode    Mode
	pod     *testpod.Pod
	dst     netip.AddrPort // what the app asks
	queries int            // queries the app made, warm-up included
	ctr0    uint64         // eBPF: dns-captured after setup
	// eBPF: program statistics around the last sequential run.
	bpfBefore, bpfAfter progStats
}

// b7: DNS capture. Every round gets fresh pods, one per mode: with iptables each UDP query
// leaves a conntrack entry behind (for 30 s or more), and a pod must not inherit the last
// round's. The nameserver the app asks is a responder outside the pod that answers with
// its own marker, so a query that escaped capture fails the run.
func (r *rig) b7() {
	s := newScope(r.b)
	defer s.Close()
	n := testpod.NewNetwork(s)
	ns := netip.AddrPortFrom(n.Addrs[3], policy.DNSPort)
	n.Start(s, testpod.ProcSpec{Args: dnsArgs(ns, markerServer)}).WaitReady(s)
	cfg := divertest.Config(s, "--redirect-dns", "--dns-servers", ns.Addr().String())
	modes := dnsModes()
	rounds := r.p.Rounds
	if *flagQuick {
		rounds = 1 // CI's smoke run: that every mode's path works is the check
	}
	for round := range rounds {
		func() {
			rs := newScope(s)
			defer rs.Close()
			var pods []*dnsPod
			for _, m := range modes {
				pods = append(pods, r.dnsPod(rs, n, m, cfg, ns))
			}
			for _, bench := range []string{B7UDP, B7TCP} {
				proto := map[string]string{B7UDP: "udp", B7TCP: "tcp"}[bench]
				for _, dp := range rotate(pods, round) {
					res := r.dnsLoad(rs, dp, proto, "--n", strconv.Itoa(r.p.B7Queries), "--warmup", strconv.Itoa(r.p.B7Warmup))
					q := Percentiles(res.micros(), 0.5, 0.99)
					r.res.Add(bench, QueryP50, 0, dp.mode, round, q[0])
					r.res.Add(bench, QueryP99, 0, dp.mode, round, q[1])
					r.res.Add(bench, QPSOne, 0, dp.mode, round, float64(res.Count)/res.Seconds)
					r.res.Add(bench, CPUQuery, 0, dp.mode, round, float64(res.CPUMicros)/float64(res.Count))
					if dp.bpfBefore != nil {
						var total time.Duration
						for name, a := range dp.bpfAfter {
							d := a.Runtime - dp.bpfBefore[name].Runtime
							total += d
							r.res.Add(bench, BPFProgNS+" "+name, 0, EBPF, round, float64(d)/float64(res.Conns))
						}
						r.res.Add(bench, BPFNSQuery, 0, EBPF, round, float64(total)/float64(res.Conns))
					}
				}
				for _, dp := range rotate(pods, round) {
					res := r.dnsLoad(rs, dp, proto, "--clients", strconv.Itoa(r.p.B7Clients),
						"--warmup", strconv.Itoa(max(r.p.B7Warmup/r.p.B7Clients, 1)), "--duration", r.p.B7Duration.String())
					r.res.Add(bench, QPSParallel, 0, dp.mode, round, float64(res.Count)/res.Seconds)
				}
			}
			for _, dp := range pods {
				if dp.mode != EBPF {
					continue
				}
				got := (&divertest.Attached{Pod: dp.pod, Opts: r.opts}).Counters(rs)[policy.ReasonDNSCaptured] - dp.ctr0
				if got != uint64(dp.queries) {
					rs.Fatalf("ebpf: the kernel captured %d DNS queries, the app asked %d", got, dp.queries)
				}
			}
		}()
	}
	for _, bench := range []string{B7UDP, B7TCP} {
		for _, m := range modes {
			r.logf("  %s %-16s p50 %s µs, %s q/s, %d clients %s q/s, CPU %s µs/query", bench, m,
				Summarize(r.res.Values(bench, QueryP50, 0, m)), Summarize(r.res.Values(bench, QPSOne, 0, m)), r.p.B7Clients,
				Summarize(r.res.Values(bench, QPSParallel, 0, m)), Summarize(r.res.Values(bench, CPUQuery, 0, m)))
		}
	}
}

// dnsPod makes mode's pod on n: the capture of queries to ns, and the stand-in.
func (r *rig) dnsPod(s *scope, n *testpod.Network, mode Mode, cfg *policy.Config, ns netip.AddrPort) *dnsPod {
	pod := n.AddPod(s)
	dp := &dnsPod{mode: mode, pod: pod, dst: ns}
	ctx := context.Background()
	switch mode {
	case Explicit:
		dp.dst = agentDNS
	case EBPF:
		lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
		if err := loader.Attach(ctx, lp, cfg, r.opts); err != nil {
			s.Fatalf("ebpf: %v", err)
		}
		s.Cleanup(func() {
			if err := loader.Detach(pod.Name, r.opts); err != nil {
				s.Errorf("detach %s: %v", pod.Name, err)
			}
		})
	default:
		if _, err := iptablesOpts(mode).Apply(ctx, pod.NetNSPath, cfg); err != nil {
			s.Fatalf("%s: %v", mode, err)
		}
	}
	pod.Start(s, testpod.ProcSpec{UID: proxyUID, GID: proxyUID,
		Args: dnsArgs(agentDNS, markerAgent)}).WaitReady(s)
	if mode == EBPF {
		dp.ctr0 = (&divertest.Attached{Pod: pod, Opts: r.opts}).Counters(s)[policy.ReasonDNSCaptured]
	}
	return dp
}

// dnsLoad runs the app's resolver (bench-dnsq) in dp's pod; a failed query or an answer
// from anyone but the stand-in, or from another address than the one asked, ends the run.
func (r *rig) dnsLoad(s *scope, dp *dnsPod, proto string, args ...string) LoadResult {
	s.Helper()
	full := append([]string{cmdDNSQuery, "--proto", proto, "--dst", dp.dst.String(), "--cgroups", dp.pod.CgroupPath}, args...)
	var before progStats
	if dp.mode == EBPF && r.bpfStats {
		before = r.progStats(s, &modePod{pod: dp.pod})
	}
	out := dp.pod.Start(s, testpod.ProcSpec{UID: appUID, GID: appUID, Args: full}).Wait(s, 3*time.Minute)
	if before != nil {
		dp.bpfBefore, dp.bpfAfter = before, r.progStats(s, &modePod{pod: dp.pod})
	}
	var res LoadResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		s.Fatalf("%s: bench-dnsq output %q: %v", dp.mode, out, err)
	}
	dp.queries += res.Conns
	if res.Errors > 0 {
		s.Fatalf("%s %s: %d queries failed (first: %s)", dp.mode, proto, res.Errors, res.FirstErr)
	}
	if res.WrongPath > 0 {
		s.Fatalf("%s %s: %d of %d answers did not come from the agent stand-in as %s", dp.mode, proto, res.WrongPath, res.Conns, dp.dst)
	}
	if res.Count == 0 {
		s.Fatalf("%s %s: no query in the measured window", dp.mode, proto)
	}
	return res
}
