package bench

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/image"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

var (
	flagOut    = flag.String("bench.out", "bench-out", "directory for results.json, results.md and the plots")
	flagDocs   = flag.String("bench.docs", "", "if set, the docs directory: write benchmarks.md and the plots there too")
	flagQuick  = flag.Bool("bench.quick", false, "smoke run: fewer rounds, shorter runs, smaller sweeps (CI)")
	flagRounds = flag.Int("bench.rounds", 0, "rounds per benchmark (0: 9, or 3 with -bench.quick)")
	flagCmd    = flag.String("bench.cmd", "", "the command to record in the report (default: make bench [QUICK=1])")
	flagOnly   = flag.String("bench.only", "", "comma-separated subset of B1,…,B8; with -bench.docs, only their sections of benchmarks.md are replaced")
	flagModes  = flag.String("bench.modes", "", "comma-separated subset of the modes (for development)")
	flagFrom   = flag.String("bench.from", "", "measure nothing: render the report again from this results.json")
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested(helpers)
	code := m.Run()
	image.Cleanup() // B5's divert binary
	os.Exit(code)
}

const (
	appUID     = divertest.AppUID
	proxyUID   = divertest.ProxyUID
	serverPort = 8080
)

// params returns the run's knobs. The full run takes about seven minutes on 2 cores; the quick
// one under two.
func params() Params {
	p := Params{
		Rounds: 9, B1Conns: 1000, B1Warmup: 100,
		B2Clients: 2, B2Duration: 2 * time.Second,
		B3Requests: 5000, B3Warmup: 500, B3BulkBytes: 256 << 20,
		B4Ns: []int{0, 10, 100, 1000, 10000}, B4Conns: 300, B4Warmup: 50,
		B5Pods:    []int{1, 10, 100, 1000},
		B6Conns:   8000,
		B7Queries: 10000, B7Warmup: 500, B7Clients: 4, B7Duration: time.Second,
		MsgSize: msgSize,
	}
	if *flagQuick {
		p = Params{
			Rounds: 3, B1Conns: 200, B1Warmup: 20,
			B2Clients: 2, B2Duration: 500 * time.Millisecond,
			B3Requests: 500, B3Warmup: 50, B3BulkBytes: 32 << 20,
			B4Ns: []int{0, 1000}, B4Conns: 100, B4Warmup: 20,
			B5Pods:    []int{1, 10},
			B6Conns:   2000,
			B7Queries: 200, B7Warmup: 20, B7Clients: 4, B7Duration: 250 * time.Millisecond,
			MsgSize: msgSize,
		}
	}
	if *flagRounds > 0 {
		p.Rounds = *flagRounds
	}
	return p
}

// BenchmarkDivert runs B1–B7 once (use -test.benchtime=1x) and writes the report. It is a
// benchmark so that `go test ./...` never runs it; `make bench` does.
func BenchmarkDivert(b *testing.B) {
	if b.N != 1 {
		b.Fatalf("run with -test.benchtime=1x: one invocation is one complete set of rounds")
	}
	if *flagFrom != "" {
		// The numbers stay those of the run that wrote the file; only the text is redone.
		js, err := os.ReadFile(*flagFrom)
		if err != nil {
			b.Fatal(err)
		}
		var res Results
		if err := json.Unmarshal(js, &res); err != nil {
			b.Fatalf("%s: %v", *flagFrom, err)
		}
		if err := Write(&res, *flagOut, *flagDocs); err != nil {
			b.Fatal(err)
		}
		return
	}
	if *flagDocs != "" && (*flagQuick || *flagModes != "" || *flagRounds != 0) {
		b.Fatalf("-bench.docs is for full runs: docs/benchmarks.md must not get quick or partial results")
	}
	r := &rig{b: b, p: params(), opts: divertest.BPFFS(b)}
	// The kernel times BPF programs only while someone holds a stats fd. It adds a clock
	// read per program run (tens of nanoseconds) for every BPF program on the machine,
	// ours only in eBPF mode: the price of knowing what the capture programs cost.
	if st, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME); err != nil {
		r.logf("no BPF run time statistics: %v", err)
	} else {
		r.bpfStats = true
		defer st.Close()
	}
	cmd := *flagCmd
	if cmd == "" {
		cmd = "make bench"
		if *flagQuick {
			cmd += " QUICK=1"
		}
		if *flagOnly != "" {
			cmd += " ONLY=" + *flagOnly
		}
	}
	r.res = &Results{
		Machine: machine(), Command: cmd, Quick: *flagQuick, Params: r.p, Start: time.Now(),
		B1Latencies: map[Mode][]float64{},
	}
	if *flagModes != "" {
		var ms []Mode
		for _, m := range strings.Split(*flagModes, ",") {
			if !slices.Contains(AllModes, Mode(m)) {
				b.Fatalf("-bench.modes: unknown mode %q", m)
			}
			ms = append(ms, Mode(m))
		}
		AllModes = ms
	}
	only := map[string]bool{}
	for _, s := range strings.Split(*flagOnly, ",") {
		if s != "" {
			only[strings.ToUpper(s)] = true
			r.res.Only = append(r.res.Only, strings.ToUpper(s))
		}
	}
	run := func(name string, fn func()) {
		if len(only) > 0 && !only[name] {
			return
		}
		start := time.Now()
		r.logf("%s ...", name)
		fn()
		r.logf("%s done in %.1fs", name, time.Since(start).Seconds())
	}
	run("B1", r.b1)
	run("B2", r.b2)
	run("B3", r.b3)
	run("B4", r.b4)
	run("B5", r.b5)
	run("B6", r.b6)
	run("B7", r.b7)
	run("B8", r.b8)
	r.res.Elapsed = time.Since(r.res.Start)
	r.res.Machine.LoadEnd = loadavg()
	if err := Write(r.res, *flagOut, *flagDocs); err != nil {
		b.Fatal(err)
	}
	r.logf("report: %s", filepath.Join(*flagOut, "results.md"))
}

// b6 is the burst: B6Conns connections to as many destinations at once, waiting in the
// proxy's accept queue until all have settled; then the proxy reads every original
// destination. A fresh pod per mode and round.
func (r *rig) b6() {
	modes := []Mode{}
	for _, m := range AllModes {
		if m == EBPF || m == NFT || m == Legacy {
			modes = append(modes, m)
		}
	}
	n := r.p.B6Conns
	rounds := r.p.Rounds
	if *flagQuick {
		rounds = 1 // CI's smoke run: one burst per mode is the check
	}
	for round := range rounds {
		for _, m := range rotate(modes, round) {
			func() {
				s := newScope(r.b)
				defer s.Close()
				pod := testpod.NewNetwork(s).AddPod(s)
				ctx := context.Background()
				switch m {
				case EBPF:
					lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
					if err := loader.Attach(ctx, lp, defaultConfig(), r.opts); err != nil {
						s.Fatal(err)
					}
					s.Cleanup(func() { _ = loader.Detach(pod.Name, r.opts) })
				default:
					if _, err := iptablesOpts(m).Apply(ctx, pod.NetNSPath, defaultConfig()); err != nil {
						s.Fatal(err)
					}
				}
				res := pod.Burst(s, netip.MustParseAddrPort("0.0.0.0:15001"), proxyUID, appUID, n)
				established, delivered := 0, 0
				want := map[string]bool{}
				for _, c := range res.Conns {
					if c.Err == "" {
						established++
						want[c.Target.String()] = true
					}
				}
				// By original destination, not by peer: NAT may have rewritten the peer.
				for _, a := range res.Accepts {
					if want[a.Orig] {
						delivered++
						delete(want, a.Orig)
					}
				}
				pct := func(k int) float64 { return 100 * float64(k) / float64(n) }
				r.res.Add(B6, BurstEstablished, 0, m, round, pct(established))
				r.res.Add(B6, BurstDelivered, 0, m, round, pct(delivered))
				r.res.Add(B6, BurstRewritten, 0, m, round, pct(len(res.Unmatched)))
				r.res.Add(B6, BurstSettleMS, 0, m, round, ms(res.Settle))
				r.logf("  B6 %-16s round %d: %d of %d established, %d delivered with their own original destination, %d source ports rewritten, settled in %s",
					m, round, established, n, delivered, len(res.Unmatched), res.Settle.Round(time.Millisecond))
			}()
		}
	}
}

// rig is one run's shared state.
type rig struct {
	b    *testing.B
	p    Params
	opts loader.Options // a private bpffs
	res  *Results
	// bpfStats: the kernel is collecting BPF program run times (BPF_ENABLE_STATS).
	bpfStats bool
}

func (r *rig) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

// scope collects the cleanups of everything testpod and the loader create for one
// scenario, so pods, processes and attachments go away when the scenario ends rather than
// when the whole run does. It forwards everything else to the benchmark.
type scope struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
}

func newScope(tb testing.TB) *scope { return &scope{TB: tb} }

func (s *scope) Cleanup(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cleanups = append(s.cleanups, f)
}

// Close runs the cleanups, last first. Call it deferred: a fatal error exits the benchmark
// goroutine through deferred calls.
func (s *scope) Close() {
	s.mu.Lock()
	fs := s.cleanups
	s.cleanups = nil
	s.mu.Unlock()
	for _, f := range slices.Backward(fs) {
		f()
	}
}

// network is a remote netns with the server in it.
type network struct {
	*testpod.Network
	server netip.AddrPort
	// ipv6: pods are IPv6-only and reach the server over IPv6.
	ipv6 bool
}

func newNetwork(s *scope) *network {
	n := testpod.NewNetwork(s)
	n.Start(s, testpod.ProcSpec{Args: []string{cmdServer, "--listen", fmt.Sprintf("0.0.0.0:%d", serverPort)}}).WaitReady(s)
	return &network{Network: n, server: netip.AddrPortFrom(n.Addrs[0], serverPort)}
}

// newNetwork6 is newNetwork for IPv6-only pods: the app dials the server's IPv6 address
// (which the remote gets with its first IPv6 pod; the server listens on [::]).
func newNetwork6(s *scope) *network {
	n := testpod.NewNetwork(s)
	n.Start(s, testpod.ProcSpec{Args: []string{cmdServer, "--listen", fmt.Sprintf("[::]:%d", serverPort)}}).WaitReady(s)
	return &network{Network: n, server: netip.AddrPortFrom(testpod.PrimaryAddr6, serverPort), ipv6: true}
}

// modePod is one mode's pod: a fresh netns and cgroup with the mode's capture installed and,
// unless direct, the proxy running in it as the proxy uid.
type modePod struct {
	mode  Mode
	pod   *testpod.Pod
	proxy *testpod.Proc
	dst   netip.AddrPort // what the app dials
	setup time.Duration  // eBPF attach or iptables apply
	conns int            // connections the app completed
	ctr0  uint64         // eBPF: the redirect counter after setup
	// eBPF: program statistics before and after the last load run.
	bpfBefore, bpfAfter progStats
}

// addPod makes a fresh pod for mode with policy cfg. A policy the mode cannot install is
// returned as an error; anything else that fails ends the benchmark.
func (r *rig) addPod(s *scope, n *network, mode Mode, cfg *policy.Config) (*modePod, error) {
	stack := testpod.IPv4Only
	if n.ipv6 {
		stack = testpod.IPv6Only
	}
	pod := n.AddStackPod(s, stack)
	mp := &modePod{mode: mode, pod: pod, dst: n.server}
	// The families as istio-iptables decides them: IPv6 for an IPv6-only pod.
	c := *cfg
	c.DecideIPv6(pod.Addrs())
	cfg = &c
	ctx := context.Background()
	start := time.Now()
	switch mode {
	case EBPF:
		lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
		if err := loader.Attach(ctx, lp, cfg, r.opts); err != nil {
			return nil, err
		}
		s.Cleanup(func() {
			if err := loader.Detach(pod.Name, r.opts); err != nil {
				s.Errorf("detach %s: %v", pod.Name, err)
			}
		})
	case NFT, Legacy:
		if _, err := iptablesOpts(mode).Apply(ctx, pod.NetNSPath, cfg); err != nil {
			return nil, err
		}
		// The rules go with the netns.
	}
	mp.setup = time.Since(start)
	// The proxy listens in the family it is reached in (IPv4 mode keeps its AF_INET listener).
	listen, local := "0.0.0.0:15001", "127.0.0.1:15001"
	if n.ipv6 {
		listen, local = "[::]:15001", "[::1]:15001"
	}
	switch mode {
	case Direct:
		return mp, nil
	case Explicit:
		mp.dst = netip.MustParseAddrPort(local)
		mp.proxy = pod.Start(s, testpod.ProcSpec{UID: proxyUID, GID: proxyUID,
			Args: []string{cmdProxy, "--listen", listen, "--upstream", n.server.String()}})
	default:
		mp.proxy = pod.Start(s, testpod.ProcSpec{UID: proxyUID, GID: proxyUID,
			Args: []string{cmdProxy, "--listen", listen}})
	}
	mp.proxy.WaitReady(s)
	if mode == EBPF {
		mp.ctr0 = r.redirects(s, mp)
	}
	return mp, nil
}

func defaultConfig() *policy.Config {
	cfg := policy.Default()
	return &cfg
}

func iptablesOpts(m Mode) iptables.Options {
	if m == Legacy {
		return iptables.Options{Backend: iptables.BackendLegacy}
	}
	return iptables.Options{Backend: iptables.BackendNFT}
}

func (r *rig) redirects(tb testing.TB, mp *modePod) uint64 {
	return (&divertest.Attached{Pod: mp.pod, Opts: r.opts}).Counters(tb)[policy.ReasonIncludedCIDR]
}

// load runs the app (bench-load) in the pod as an ordinary uid and returns its result; any
// failed connection or any connection on the wrong path ends the benchmark.
func (r *rig) load(s *scope, mp *modePod, args ...string) LoadResult {
	s.Helper()
	full := append([]string{cmdLoad, "--dst", mp.dst.String(), "--proxied=" + strconv.FormatBool(mp.mode.Proxied()),
		"--cgroups", mp.pod.CgroupPath + "," + mp.pod.Net.CgroupPath}, args...)
	var before progStats
	if (mp.mode == EBPF || mp.mode == EBPFTrace) && r.bpfStats {
		before = r.progStats(s, mp)
	}
	out := mp.pod.Start(s, testpod.ProcSpec{UID: appUID, GID: appUID, Args: full}).Wait(s, 3*time.Minute)
	if before != nil {
		mp.bpfBefore, mp.bpfAfter = before, r.progStats(s, mp)
	}
	var res LoadResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		s.Fatalf("%s: bench-load output %q: %v", mp.mode, out, err)
	}
	mp.conns += res.Conns
	if res.Errors > 0 {
		time.Sleep(100 * time.Millisecond) // let the proxy's last words reach us
		s.Fatalf("%s: %d connections or requests failed (first: %s)%s", mp.mode, res.Errors, res.FirstErr, proxyErr(mp))
	}
	if res.WrongPath > 0 {
		want := "through the proxy"
		if !mp.mode.Proxied() {
			want = "straight to the server"
		}
		s.Fatalf("%s: %d of %d connections did not go %s", mp.mode, res.WrongPath, res.Conns, want)
	}
	return res
}

// proxyErr describes what went wrong with the pod's proxy, if anything: what it wrote to
// stderr, and whether it is still running.
func proxyErr(mp *modePod) string {
	if mp.proxy == nil {
		return ""
	}
	var msg []string
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", mp.proxy.Cmd.Process.Pid)); err != nil || strings.Contains(string(st), ") Z ") {
		time.Sleep(50 * time.Millisecond)
		msg = append(msg, fmt.Sprintf("the proxy has exited (%v)", mp.proxy.Cmd.ProcessState))
	}
	if e := mp.proxy.Stderr(); e != "" {
		msg = append(msg, "it wrote: "+strings.TrimSpace(e))
	}
	if len(msg) == 0 {
		return ""
	}
	return "; " + strings.Join(msg, "; ")
}

// check makes sure every mode did what it claims: the proxy saw no error, and in eBPF mode
// the kernel counted one redirect per connection of the app.
func (r *rig) check(s *scope, pods []*modePod) {
	s.Helper()
	for _, mp := range pods {
		if e := proxyErr(mp); e != "" {
			s.Fatalf("%s%s", mp.mode, e)
		}
		if mp.mode == EBPF {
			if got := r.redirects(s, mp) - mp.ctr0; got != uint64(mp.conns) {
				s.Fatalf("ebpf: the kernel redirected %d connections, the app made %d", got, mp.conns)
			}
		}
	}
}

// rotate returns the modes in round r's order: each round starts one mode later, so no
// mode always runs first (after a teardown) or last.
func rotate[T any](xs []T, r int) []T {
	k := r % len(xs)
	return append(slices.Clone(xs[k:]), xs[:k]...)
}

// pods makes one fresh pod per mode, all on n.
func (r *rig) pods(s *scope, n *network, cfg *policy.Config) []*modePod {
	var out []*modePod
	for _, m := range AllModes {
		mp, err := r.addPod(s, n, m, cfg)
		if err != nil {
			s.Fatalf("%s: %v", m, err)
		}
		out = append(out, mp)
	}
	return out
}

func (r *rig) connArgs(n, warmup int) []string {
	return []string{"--kind", "conn", "--n", strconv.Itoa(n), "--warmup", strconv.Itoa(warmup)}
}

// connRound runs one B1-style round in mp and records p50/p90/p99; it returns the latencies
// in microseconds.
func (r *rig) connRound(s *scope, bench string, param int, mp *modePod, round, n, warmup int) []float64 {
	res := r.load(s, mp, r.connArgs(n, warmup)...)
	us := res.micros()
	q := Percentiles(us, 0.5, 0.9, 0.99)
	r.res.Add(bench, P50, param, mp.mode, round, q[0])
	r.res.Add(bench, P90, param, mp.mode, round, q[1])
	r.res.Add(bench, P99, param, mp.mode, round, q[2])
	r.res.Add(bench, CPUConn, param, mp.mode, round, float64(res.CPUMicros)/float64(res.Count))
	if mp.mode == EBPF || mp.mode == EBPFTrace {
		r.recordBPFFor(mp.mode, bench, param, round, mp.bpfBefore, mp.bpfAfter, res.Conns)
	}
	return us
}

// b1: connection setup latency, over IPv4 (B1) then IPv6 (B1IPv6). One fresh pod per mode
// for the whole benchmark; the rounds interleave the modes.
func (r *rig) b1() {
	for _, bench := range []string{B1, B1IPv6} {
		func() {
			s := newScope(r.b)
			defer s.Close()
			n := newNetwork(s)
			if bench == B1IPv6 {
				n = newNetwork6(s)
			}
			pods := r.pods(s, n, defaultConfig())
			for round := range r.p.Rounds {
				for _, mp := range rotate(pods, round) {
					us := r.connRound(s, bench, 0, mp, round, r.p.B1Conns, r.p.B1Warmup)
					if bench == B1 {
						r.res.B1Latencies[mp.mode] = append(r.res.B1Latencies[mp.mode], us...)
					}
				}
			}
			r.check(s, pods)
			for _, m := range AllModes {
				r.logf("  %s %-16s p50 %s µs, CPU %s µs/conn", bench, m, Summarize(r.res.Values(bench, P50, 0, m)), Summarize(r.res.Values(bench, CPUConn, 0, m)))
			}
		}()
	}
}

// b2: connection rate. Thousands of connections per run, so every round gets fresh pods:
// the proxy's side of each connection stays in TIME_WAIT for a minute.
func (r *rig) b2() {
	s := newScope(r.b)
	defer s.Close()
	n := newNetwork(s)
	cfg := defaultConfig()
	for round := range r.p.Rounds {
		func() {
			rs := newScope(s)
			defer rs.Close()
			pods := r.pods(rs, n, cfg)
			for _, mp := range rotate(pods, round) {
				res := r.load(rs, mp, "--kind", "rate", "--clients", strconv.Itoa(r.p.B2Clients),
					"--duration", r.p.B2Duration.String())
				r.res.Add(B2, ConnRate, 0, mp.mode, round, float64(res.Count)/res.Seconds)
				r.res.Add(B2, CPUConn, 0, mp.mode, round, float64(res.CPUMicros)/float64(res.Count))
				if mp.mode == EBPF {
					r.recordBPF(B2, 0, round, mp.bpfBefore, mp.bpfAfter, res.Conns)
				}
			}
			r.check(rs, pods)
		}()
	}
	for _, m := range AllModes {
		r.logf("  B2 %-16s %s conn/s, CPU %s µs/conn", m, Summarize(r.res.Values(B2, ConnRate, 0, m)), Summarize(r.res.Values(B2, CPUConn, 0, m)))
	}
}

// b3: one keep-alive connection: round trips, then bulk throughput app → proxy → server.
func (r *rig) b3() {
	s := newScope(r.b)
	defer s.Close()
	n := newNetwork(s)
	pods := r.pods(s, n, defaultConfig())
	for round := range r.p.Rounds {
		for _, mp := range rotate(pods, round) {
			res := r.load(s, mp, "--kind", "rr", "--n", strconv.Itoa(r.p.B3Requests), "--warmup", strconv.Itoa(r.p.B3Warmup))
			q := Percentiles(res.micros(), 0.5, 0.99)
			r.res.Add(B3, RRP50, 0, mp.mode, round, q[0])
			r.res.Add(B3, RRP99, 0, mp.mode, round, q[1])
			r.res.Add(B3, CPURR, 0, mp.mode, round, float64(res.CPUMicros)/float64(res.Count))
		}
		for _, mp := range rotate(pods, round) {
			res := r.load(s, mp, "--kind", "bulk", "--bytes", strconv.FormatInt(r.p.B3BulkBytes, 10))
			r.res.Add(B3, Bulk, 0, mp.mode, round, float64(res.Count)/(1<<20)/res.Seconds)
			r.res.Add(B3, CPUBulk, 0, mp.mode, round, float64(res.CPUMicros)/1e3/(float64(res.Count)/(1<<30)))
		}
	}
	r.check(s, pods)
	for _, m := range AllModes {
		r.logf("  B3 %-16s rr p50 %s µs, bulk %s MiB/s", m,
			Summarize(r.res.Values(B3, RRP50, 0, m)), Summarize(r.res.Values(B3, Bulk, 0, m)))
	}
}

// ScaleConfig is the default policy plus n excluded CIDRs (kind B4CIDRs), IPv6 ranges
// (B4CIDRsIPv6) or excluded outbound ports (B4Ports), none of which matches the benchmark's
// traffic (198.18.0.1:8080 or [fd00:18::1]:8080, and the proxy's 15001).
func ScaleConfig(kind string, n int) *policy.Config {
	cfg := policy.Default()
	for i := range n {
		switch kind {
		case B4CIDRs:
			// 10.0.0.0/24, 10.0.1.0/24, ...: /24s as real exclusion lists have them.
			cfg.OutboundExcludeCIDRs = append(cfg.OutboundExcludeCIDRs,
				netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24))
		case B4CIDRsIPv6:
			// fd01:0:0::/48, fd01:0:1::/48, ...
			cfg.OutboundExcludeCIDRs = append(cfg.OutboundExcludeCIDRs,
				netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x01, 4: byte(i >> 8), 5: byte(i)}), 48))
		case B4Ports:
			cfg.OutboundExcludePorts = append(cfg.OutboundExcludePorts, uint16(20000+i))
		}
	}
	return &cfg
}

// b4: B1 as the policy grows. For each kind and N, one fresh pod per mode (installing a big
// policy is the slow part); the rounds interleave the modes.
func (r *rig) b4() {
	s := newScope(r.b)
	defer s.Close()
	n4 := newNetwork(s)
	var n6 *network // made when first needed
	for _, kind := range []string{B4CIDRs, B4Ports, B4CIDRsIPv6} {
		n := n4
		if kind == B4CIDRsIPv6 {
			if n6 == nil {
				n6 = newNetwork6(s)
			}
			n = n6
		}
		for _, N := range r.p.B4Ns {
			func() {
				ps := newScope(s)
				defer ps.Close()
				cfg := ScaleConfig(kind, N)
				var pods []*modePod
				for _, m := range AllModes {
					mp, err := r.addPod(ps, n, m, cfg)
					if err != nil {
						r.logf("  %s N=%d %s: cannot install the policy: %v", kind, N, m, err)
						r.res.Failures = append(r.res.Failures, Failure{kind, N, m, err.Error()})
						continue
					}
					if m == EBPF || m == NFT || m == Legacy {
						r.res.Add(kind, SetupMS, N, m, 0, float64(mp.setup.Microseconds())/1e3)
					}
					pods = append(pods, mp)
				}
				for round := range r.p.Rounds {
					for _, mp := range rotate(pods, round) {
						r.connRound(ps, kind, N, mp, round, r.p.B4Conns, r.p.B4Warmup)
					}
				}
				r.check(ps, pods)
				var line []string
				for _, mp := range pods {
					line = append(line, fmt.Sprintf("%s %.0f", mp.mode, Summarize(r.res.Values(kind, P50, N, mp.mode)).Median))
				}
				r.logf("  %s N=%-5d p50 µs: %s", kind, N, strings.Join(line, ", "))
			}()
		}
	}
}

// b5: per-pod cost. Pods are attached one after another up to the largest count, timing
// each attach, and the kernel memory of all attached pods is read at each count; then they
// are detached in reverse order. The same pods then get istio's rules with each iptables
// backend (apply, then cleanup).
func (r *rig) b5() {
	s := newScope(r.b)
	defer s.Close()
	total := slices.Max(r.p.B5Pods)
	pods := make([]*testpod.Pod, total)
	var n *network
	for i := range pods {
		if i%250 == 0 { // testpod wires at most 254 pods to a network
			n = newNetwork(s)
		}
		pods[i] = n.AddPod(s)
	}
	cfg := defaultConfig()
	ctx := context.Background()
	// Whatever an error leaves attached is detached at the end.
	s.Cleanup(func() {
		for _, p := range pods {
			if err := loader.Detach(p.Name, r.opts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
				s.Errorf("detach %s: %v", p.Name, err)
			}
		}
	})

	attach := make([]float64, total)
	detach := make([]float64, total)
	attachCPU := make([]float64, total)
	mem := map[int][2]int64{}
	for i, p := range pods {
		start, cpu := time.Now(), cpuTime()
		if err := loader.Attach(ctx, loader.Pod{ID: p.Name, Cgroup: p.CgroupPath, NetNS: p.NetNSPath}, cfg, r.opts); err != nil {
			s.Fatalf("attach pod %d: %v", i+1, err)
		}
		attach[i], attachCPU[i] = ms(time.Since(start)), ms(cpuTime()-cpu)
		if slices.Contains(r.p.B5Pods, i+1) {
			// Every pod's own objects, and the node's once (its maps and programs, and the
			// maps of the slots kept for the next pods): per pod is the total over pods.
			nm, np, err := NodeMemlock(r.opts)
			if err != nil {
				s.Fatalf("memlock of the node's objects: %v", err)
			}
			total := [2]int64{sum(nm), sum(np)}
			for k, q := range pods[:i+1] {
				m, pr, err := PodMemlock(r.opts, q.Name)
				if err != nil {
					s.Fatalf("memlock of %s: %v", q.Name, err)
				}
				total[0] += sum(m)
				total[1] += sum(pr)
				if k == 0 {
					r.res.B5Memlock = map[string]int64{}
					for name, v := range m {
						r.res.B5Memlock["map "+name] = v
					}
					for name, v := range pr {
						r.res.B5Memlock["program "+name] = v
					}
					for name, v := range nm {
						r.res.B5Memlock["node map "+name] = v
					}
					for name, v := range np {
						r.res.B5Memlock["node program "+name] = v
					}
				}
			}
			mem[i+1] = total
		}
	}
	reattach := make([]float64, total)
	reattachCPU := make([]float64, total)
	for i, p := range pods {
		start, cpu := time.Now(), cpuTime()
		if err := loader.Attach(ctx, loader.Pod{ID: p.Name, Cgroup: p.CgroupPath, NetNS: p.NetNSPath}, cfg, r.opts); err != nil {
			s.Fatalf("re-attach pod %d: %v", i+1, err)
		}
		reattach[i], reattachCPU[i] = ms(time.Since(start)), ms(cpuTime()-cpu)
	}
	for i := total - 1; i >= 0; i-- {
		start := time.Now()
		if err := loader.Detach(pods[i].Name, r.opts); err != nil {
			s.Fatalf("detach pod %d: %v", i+1, err)
		}
		detach[i] = ms(time.Since(start))
	}
	r.addPodCosts(EBPF, attach, attachCPU, reattach, reattachCPU, detach, mem)
	// The init runs before any iptables rule has been written in these netns: an eBPF init
	// container looks for istio's rules, which costs nothing where no table exists, as in a
	// new pod's netns.
	r.b5Init(s, pods)

	for _, m := range []Mode{NFT, Legacy} {
		o := iptablesOpts(m)
		for i, p := range pods {
			start, cpu := time.Now(), cpuTime()
			if _, err := o.Apply(ctx, p.NetNSPath, cfg); err != nil {
				s.Fatalf("%s apply pod %d: %v", m, i+1, err)
			}
			attach[i], attachCPU[i] = ms(time.Since(start)), ms(cpuTime()-cpu)
		}
		for i, p := range pods {
			start, cpu := time.Now(), cpuTime()
			if _, err := o.Apply(ctx, p.NetNSPath, cfg); err != nil {
				s.Fatalf("%s re-apply pod %d: %v", m, i+1, err)
			}
			reattach[i], reattachCPU[i] = ms(time.Since(start)), ms(cpuTime()-cpu)
		}
		for i := total - 1; i >= 0; i-- {
			start := time.Now()
			if err := o.Cleanup(ctx, pods[i].NetNSPath); err != nil {
				s.Fatalf("%s cleanup pod %d: %v", m, i+1, err)
			}
			detach[i] = ms(time.Since(start))
		}
		r.addPodCosts(m, attach, attachCPU, reattach, reattachCPU, detach, nil)
	}
	for _, c := range r.res.B5 {
		r.logf("  B5 %-16s %3d pods: attach %s ms (CPU %s ms), re-attach %s ms (CPU %s ms), detach %s ms, memlock/pod %d KiB",
			c.Mode, c.Pods, c.Attach, c.AttachCPU, c.Reattach, c.ReattachCPU, c.Detach, c.Memlock/int64(c.Pods)/1024)
	}
}

func (r *rig) addPodCosts(m Mode, attach, attachCPU, reattach, reattachCPU, detach []float64, mem map[int][2]int64) {
	from := 1
	for _, k := range r.p.B5Pods {
		c := PodCost{Mode: m, Pods: k, From: from, Attach: Summarize(attach[from-1 : k]),
			AttachCPU: Summarize(attachCPU[from-1 : k]), Reattach: Summarize(reattach[from-1 : k]),
			ReattachCPU: Summarize(reattachCPU[from-1 : k]), Detach: Summarize(detach[from-1 : k])}
		if mm, ok := mem[k]; ok {
			c.MapBytes, c.ProgByte, c.Memlock = mm[0], mm[1], mm[0]+mm[1]
		}
		r.res.B5 = append(r.res.B5, c)
		from = k + 1
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }

// cpuTime is the CPU time (user and system) used so far by this process and by its reaped
// children (iptables-restore, iptables-save).
func cpuTime() time.Duration {
	var total time.Duration
	for _, who := range []int{unix.RUSAGE_SELF, unix.RUSAGE_CHILDREN} {
		var ru unix.Rusage
		if unix.Getrusage(who, &ru) == nil {
			total += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
	}
	return total
}

// PodMemlock returns the kernel memory (memlock, as /proc/self/fdinfo reports it) of an
// attached pod's own objects: the maps pinned in its directory, by map name, and the
// programs its pinned links hold that are its own, by link (with the node's programs,
// loader/node.go, only sk_lookup; NodeMemlock counts the rest once).
func PodMemlock(opts loader.Options, id string) (maps, progs map[string]int64, err error) {
	dir := loader.PinDir(opts, id)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, err
	}
	node, err := nodeProgramIDs(opts)
	if err != nil {
		return nil, nil, err
	}
	maps, progs = map[string]int64{}, map[string]int64{}
	for _, e := range entries {
		if e.Type()&os.ModeSymlink != 0 {
			continue // the pod's name and slot
		}
		pin := filepath.Join(dir, e.Name())
		if name, ok := strings.CutPrefix(e.Name(), "link_"); ok {
			err := linkProgram(pin, func(p *ebpf.Program) error {
				info, err := p.Info()
				if err != nil {
					return err
				}
				if id, _ := info.ID(); node[id] {
					return nil
				}
				b, err := fdMemlock(p.FD())
				progs[name] = b
				if err != nil {
					return err
				}
				// Its own .rodata (sk_lookup's slot), which only the program holds.
				ids, _ := info.MapIDs()
				for _, id := range ids {
					m, err := ebpf.NewMapFromID(id)
					if err != nil {
						continue
					}
					if mi, err := m.Info(); err == nil && strings.HasSuffix(mi.Name, ".rodata") {
						if b, err := fdMemlock(m.FD()); err == nil {
							maps[name+" .rodata"] = b
						}
					}
					m.Close()
				}
				return nil
			})
			if err != nil {
				return nil, nil, err
			}
			continue
		}
		m, err := ebpf.LoadPinnedMap(pin, nil)
		if err != nil {
			return nil, nil, err
		}
		b, err := fdMemlock(m.FD())
		m.Close()
		if err != nil {
			return nil, nil, err
		}
		maps[e.Name()] = b
	}
	return maps, progs, nil
}

// NodeMemlock returns the kernel memory of the node's objects (loader/node.go): its maps,
// by name; the maps of the slots no pod holds (kept for the next pods), as "spare slots";
// and each build's programs, by name.
func NodeMemlock(opts loader.Options) (maps, progs map[string]int64, err error) {
	maps, progs = map[string]int64{}, map[string]int64{}
	dir := filepath.Join(opts.BPFFS, "divert_node")
	entries, err := os.ReadDir(filepath.Join(dir, "maps"))
	if err != nil {
		return nil, nil, err
	}
	taken := map[ebpf.MapID]bool{}
	ids, err := loader.List(opts)
	if err != nil {
		return nil, nil, err
	}
	for _, id := range ids {
		pins, _ := os.ReadDir(loader.PinDir(opts, id))
		for _, e := range pins {
			if m, err := ebpf.LoadPinnedMap(filepath.Join(loader.PinDir(opts, id), e.Name()), nil); err == nil {
				if info, err := m.Info(); err == nil {
					mid, _ := info.ID()
					taken[mid] = true
				}
				m.Close()
			}
		}
	}
	for _, e := range entries {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, "maps", e.Name()), nil)
		if err != nil {
			return nil, nil, err
		}
		b, err := fdMemlock(m.FD())
		if err == nil && m.Type() == ebpf.ArrayOfMaps {
			var slot, inner uint32
			for it := m.Iterate(); it.Next(&slot, &inner); {
				if taken[ebpf.MapID(inner)] {
					continue
				}
				im, err := ebpf.NewMapFromID(ebpf.MapID(inner))
				if err != nil {
					continue
				}
				ib, _ := fdMemlock(im.FD())
				maps["spare slots"] += ib
				im.Close()
			}
		}
		m.Close()
		if err != nil {
			return nil, nil, err
		}
		maps[e.Name()] = b
	}
	builds, err := os.ReadDir(filepath.Join(dir, "programs"))
	if err != nil {
		return nil, nil, err
	}
	running, err := podProgramIDs(opts)
	if err != nil {
		return nil, nil, err
	}
	for _, bd := range builds {
		pins, err := os.ReadDir(filepath.Join(dir, "programs", bd.Name()))
		if err != nil {
			return nil, nil, err
		}
		for _, e := range pins {
			if e.Type()&os.ModeSymlink != 0 {
				continue // which sk_lookup the build uses
			}
			p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "programs", bd.Name(), e.Name()), nil)
			if err != nil {
				return nil, nil, err
			}
			b, err := fdMemlock(p.FD())
			var id ebpf.ProgramID
			if info, ierr := p.Info(); ierr == nil {
				id, _ = info.ID()
			}
			p.Close()
			if err != nil {
				return nil, nil, err
			}
			if strings.HasPrefix(e.Name(), slotSkLookupPrefix) {
				// A slot's sk_lookup: its pod's own (PodMemlock counts it), or kept
				// for the next pod in a free slot, with that slot's maps.
				if !running[id] {
					maps["spare slots"] += b
				}
				continue
			}
			progs[e.Name()] += b
		}
	}
	return maps, progs, nil
}

// nodeProgramIDs are the ids of the node's programs, every build's.
func nodeProgramIDs(opts loader.Options) (map[ebpf.ProgramID]bool, error) {
	ids := map[ebpf.ProgramID]bool{}
	dir := filepath.Join(opts.BPFFS, "divert_node", "programs")
	builds, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, bd := range builds {
		pins, _ := os.ReadDir(filepath.Join(dir, bd.Name()))
		for _, e := range pins {
			if e.Type()&os.ModeSymlink != 0 || strings.HasPrefix(e.Name(), slotSkLookupPrefix) {
				continue // a slot's sk_lookup is its pod's own
			}
			p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, bd.Name(), e.Name()), nil)
			if err != nil {
				return nil, err
			}
			if info, err := p.Info(); err == nil {
				id, _ := info.ID()
				ids[id] = true
			}
			p.Close()
		}
	}
	return ids, nil
}

func sum(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// linkProgram calls fn with the program a pinned link holds.
func linkProgram(pin string, fn func(*ebpf.Program) error) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return err
	}
	prog, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return err
	}
	defer prog.Close()
	return fn(prog)
}

// progStats is the kernel's run time and run count of each program attached for a pod
// (collected while BPF statistics are enabled), by link name.
type progStats map[string]ebpf.ProgramStats

func (r *rig) progStats(tb testing.TB, mp *modePod) progStats {
	tb.Helper()
	dir := loader.PinDir(r.opts, mp.pod.Name)
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	st := progStats{}
	for _, e := range entries {
		name, ok := strings.CutPrefix(e.Name(), "link_")
		if !ok {
			continue
		}
		err := linkProgram(filepath.Join(dir, e.Name()), func(p *ebpf.Program) error {
			s, err := p.Stats()
			if err == nil {
				st[name] = *s
			}
			return err
		})
		if err != nil {
			tb.Fatalf("stats of %s: %v", e.Name(), err)
		}
	}
	return st
}

// recordBPF records the eBPF programs' own run time per connection between two readings.
func (r *rig) recordBPF(bench string, param, round int, before, after progStats, conns int) {
	r.recordBPFFor(EBPF, bench, param, round, before, after, conns)
}

// recordBPFFor is recordBPF for another mode's eBPF pod (B8's ebpf-trace).
func (r *rig) recordBPFFor(mode Mode, bench string, param, round int, before, after progStats, conns int) {
	if !r.bpfStats || conns == 0 {
		return
	}
	var total time.Duration
	var runs uint64
	for name, a := range after {
		b := before[name]
		total += a.Runtime - b.Runtime
		runs += a.RunCount - b.RunCount
		r.res.Add(bench, BPFProgNS+" "+name, param, mode, round, float64(a.Runtime-b.Runtime)/float64(conns))
	}
	r.res.Add(bench, BPFNS, param, mode, round, float64(total)/float64(conns))
	r.res.Add(bench, BPFRuns, param, mode, round, float64(runs)/float64(conns))
}

// fdMemlock reads the "memlock:" line of a BPF object's fdinfo.
func fdMemlock(fd int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", fd))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "memlock:"); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("fd %d: no memlock in fdinfo", fd)
}

// slotSkLookupPrefix names the sk_lookup programs a build's directory keeps per slot
// (loader/node.go's slotSkLookupPin).
const slotSkLookupPrefix = "sk_lookup_slot_"

// podProgramIDs are the programs the attached pods' pinned links run.
func podProgramIDs(opts loader.Options) (map[ebpf.ProgramID]bool, error) {
	ids := map[ebpf.ProgramID]bool{}
	pods, err := loader.List(opts)
	if err != nil {
		return nil, err
	}
	for _, pod := range pods {
		st, err := loader.Status(pod, opts)
		if err != nil {
			return nil, err
		}
		for _, p := range st.Programs {
			ids[ebpf.ProgramID(p.ProgramID)] = true
		}
	}
	return ids, nil
}
