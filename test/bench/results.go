// Package bench measures divert's data path and per-pod cost against the alternatives, side
// by side in one run: no proxy (direct), an app that dials the proxy itself (explicit, the
// floor for any interception), eBPF capture, and istio-iptables' rules with the nft and the
// legacy iptables backends. BenchmarkDivert (bench_test.go) drives it; `make bench` runs it
// and writes a Markdown report, plots and docs/benchmarks.md.
package bench

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Mode is how the app's connections reach the server.
type Mode string

const (
	// Direct: the app dials the server, no proxy, no capture.
	Direct Mode = "direct"
	// Explicit: the app dials the proxy, which forwards to a fixed upstream; no capture and
	// no SO_ORIGINAL_DST. The floor for any interception.
	Explicit Mode = "explicit"
	// EBPF: divert's programs capture the app's connection to the proxy.
	EBPF Mode = "ebpf"
	// NFT: istio-iptables' rules through iptables-nft.
	NFT Mode = "iptables-nft"
	// Legacy: istio-iptables' rules through iptables-legacy.
	Legacy Mode = "iptables-legacy"
)

// AllModes is every mode, in report order.
var AllModes = []Mode{Direct, Explicit, EBPF, NFT, Legacy}

// EBPFTrace is B8's eBPF pod with divert trace on and a reader draining it (not one of
// AllModes: only B8 runs it).
const EBPFTrace Mode = "ebpf-trace"

// EBPFReused is B5's init run of a pod into a slot an earlier pod left (its maps and
// sk_lookup program kept): pods coming and going, as on a node that has run a while.
const EBPFReused Mode = "ebpf-reused"

// Proxied reports whether the app's connections go through the proxy.
func (m Mode) Proxied() bool { return m != Direct }

// Benchmarks and metrics, as recorded in Measurement.
const (
	B1      = "B1"       // connection setup: sequential connect + request/response + close
	B2      = "B2"       // connection rate: 2 clients, a new connection per request
	B3      = "B3"       // one keep-alive connection: round trips, then bulk throughput
	B4CIDRs = "B4-cidrs" // B1 with N excluded CIDRs (-x)
	B4Ports = "B4-ports" // B1 with N excluded outbound ports (-o)
	// The same over IPv6, in IPv6-only pods (istio's ip6tables rules, eBPF's IPv6 path).
	B1IPv6      = "B1-ipv6"       // B1
	B4CIDRsIPv6 = "B4-cidrs-ipv6" // B4-cidrs with N excluded IPv6 ranges
	B6          = "B6"            // a burst of connections waiting in the proxy's accept queue
	B7UDP       = "B7-udp"        // DNS capture: a query per UDP socket, through the capture to the agent
	B7TCP       = "B7-tcp"        // the same over TCP
	B8          = "B8"            // B1 and B2's rate on an eBPF pod, divert trace off and on

	P50      = "p50 µs"
	P90      = "p90 µs"
	P99      = "p99 µs"
	ConnRate = "conn/s"
	RRP50    = "round trip p50 µs"
	RRP99    = "round trip p99 µs"
	Bulk     = "bulk MiB/s"
	SetupMS  = "attach/apply ms" // B4: time to install the policy in a fresh pod
	// B6, percent of the burst's connections: established by the app, and delivered to
	// the proxy with their own original destination; where NAT rewrote the source port
	// (the proxy's peer is not the app's address); and the burst's time to settle.
	BurstEstablished = "established %"
	BurstDelivered   = "delivered with own original destination %"
	BurstRewritten   = "source port rewritten %"
	BurstSettleMS    = "all connects settled ms"
	// B7, per DNS query: latency of sequential queries, the rate of one resolver asking back
	// to back and of B7Clients in parallel, CPU time, and eBPF's programs' time.
	QueryP50    = "query p50 µs"
	QueryP99    = "query p99 µs"
	QPSOne      = "queries/s, 1 client"
	QPSParallel = "queries/s, parallel"
	CPUQuery    = "CPU µs/query"
	BPFNSQuery  = "BPF programs ns/query"
	// CPU time of the app, proxy and server (their cgroups) per unit of work.
	CPUConn = "CPU µs/conn"
	// B8: decisions the ring buffer had no room for, percent of the connections.
	TraceLost = "trace records lost %"
	CPURR     = "CPU µs/round trip"
	CPUBulk   = "CPU ms/GiB"
	// eBPF only: the kernel's run time of divert's programs (BPF_ENABLE_STATS) per app
	// connection, in total, per program (BPFProgNS + " " + program) and how many runs.
	BPFNS     = "BPF programs ns/conn"
	BPFProgNS = "BPF ns/conn"
	BPFRuns   = "BPF program runs/conn"
)

// Measurement is one figure of one round.
type Measurement struct {
	Bench  string  `json:"bench"`
	Metric string  `json:"metric"`
	Param  int     `json:"param"` // N for B4, else 0
	Mode   Mode    `json:"mode"`
	Round  int     `json:"round"`
	Value  float64 `json:"value"`
}

// Failure records a configuration a mode could not run (e.g. a policy too large for it).
type Failure struct {
	Bench string `json:"bench"`
	Param int    `json:"param"`
	Mode  Mode   `json:"mode"`
	Err   string `json:"err"`
}

// PodCost is B5 for one mode and one group of pods: the time to attach (apply) and detach
// (clean up) the k-th pod while k-1 others are attached, over the pods of the group, and
// the kernel memory (memlock of maps and programs) held per pod once all pods up to the
// group's last are attached.
type PodCost struct {
	Mode   Mode    `json:"mode"`
	Pods   int     `json:"pods"`      // pods attached at the end of the group: 1, 10, 100
	From   int     `json:"from"`      // first pod of the group (1-based)
	Attach Summary `json:"attach_ms"` // over the pods From..Pods
	// AttachCPU is the CPU time of the attach (this process and the tools it ran), which a
	// busy machine inflates much less than the wall time.
	AttachCPU Summary `json:"attach_cpu_ms"`
	// Reattach is attaching pods From..Pods again with the same policy once every pod is
	// attached, as the node agent does for every pod when it starts (eBPF: the update path;
	// iptables: Apply finding its rules in place); ReattachCPU its CPU time.
	Reattach    Summary `json:"reattach_ms"`
	ReattachCPU Summary `json:"reattach_cpu_ms"`
	Detach      Summary `json:"detach_ms"` // detaching pods From..Pods (while 0..From-1 remain)
	Memlock     int64   `json:"memlock_bytes"`
	MapBytes    int64   `json:"map_bytes"`  // of Memlock, maps
	ProgByte    int64   `json:"prog_bytes"` // of Memlock, programs
}

// Machine describes where the run happened.
type Machine struct {
	CPUs     int    `json:"cpus"`
	CPU      string `json:"cpu"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"`
	Iptables string `json:"iptables"`
	LoadAvg  string `json:"loadavg_start"`
	LoadEnd  string `json:"loadavg_end"`
}

// Params are the knobs of a run.
type Params struct {
	Rounds      int           `json:"rounds"`
	B1Conns     int           `json:"b1_conns"`
	B1Warmup    int           `json:"b1_warmup"`
	B2Clients   int           `json:"b2_clients"`
	B2Duration  time.Duration `json:"b2_duration"`
	B3Requests  int           `json:"b3_requests"`
	B3Warmup    int           `json:"b3_warmup"`
	B3BulkBytes int64         `json:"b3_bulk_bytes"`
	B4Ns        []int         `json:"b4_ns"`
	B4Conns     int           `json:"b4_conns"`
	B4Warmup    int           `json:"b4_warmup"`
	B5Pods      []int         `json:"b5_pods"`
	B6Conns     int           `json:"b6_conns"`
	B7Queries   int           `json:"b7_queries"`
	B7Warmup    int           `json:"b7_warmup"`
	B7Clients   int           `json:"b7_clients"`
	B7Duration  time.Duration `json:"b7_duration"`
	MsgSize     int           `json:"msg_size"`
}

// Results is everything one run produced.
type Results struct {
	Machine      Machine              `json:"machine"`
	Command      string               `json:"command"`
	Quick        bool                 `json:"quick"`
	Only         []string             `json:"only,omitempty"` // -bench.only: the benchmarks run, if not all
	Params       Params               `json:"params"`
	Start        time.Time            `json:"start"`
	Elapsed      time.Duration        `json:"elapsed"`
	Measurements []Measurement        `json:"measurements"`
	Failures     []Failure            `json:"failures,omitempty"`
	B1Latencies  map[Mode][]float64   `json:"b1_latencies_us"` // every measured B1 connection, all rounds
	B5           []PodCost            `json:"b5"`
	B5Memlock    map[string]int64     `json:"b5_memlock_one_pod"` // eBPF, by map and program`
	Extra        map[string][]float64 `json:"extra,omitempty"`
}

// Add records one figure.
func (r *Results) Add(bench, metric string, param int, mode Mode, round int, v float64) {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return // nothing was measured (JSON could not hold it either)
	}
	r.Measurements = append(r.Measurements, Measurement{bench, metric, param, mode, round, v})
}

// Values returns a figure's values, one per round, in round order.
func (r *Results) Values(bench, metric string, param int, mode Mode) []float64 {
	byRound := r.byRound(bench, metric, param, mode)
	rounds := make([]int, 0, len(byRound))
	for k := range byRound {
		rounds = append(rounds, k)
	}
	slices.Sort(rounds)
	out := make([]float64, 0, len(rounds))
	for _, k := range rounds {
		out = append(out, byRound[k])
	}
	return out
}

func (r *Results) byRound(bench, metric string, param int, mode Mode) map[int]float64 {
	m := map[int]float64{}
	for _, x := range r.Measurements {
		if x.Bench == bench && x.Metric == metric && x.Param == param && x.Mode == mode {
			m[x.Round] = x.Value
		}
	}
	return m
}

// Ratio summarises a/b computed round by round (the modes of a round ran back to back, so
// pairing by round cancels most of the machine's drift).
func (r *Results) Ratio(bench, metric string, param int, a, b Mode) Summary {
	return Summarize(r.Ratios(bench, metric, param, a, b))
}

// Ratios returns a/b for every round that has both.
func (r *Results) Ratios(bench, metric string, param int, a, b Mode) []float64 {
	ra, rb := r.byRound(bench, metric, param, a), r.byRound(bench, metric, param, b)
	var ratios []float64
	for k, va := range ra {
		if vb, ok := rb[k]; ok && vb != 0 {
			ratios = append(ratios, va/vb)
		}
	}
	return ratios
}

// Failed returns the failure of a mode for a benchmark and parameter, if any.
func (r *Results) Failed(bench string, param int, mode Mode) (Failure, bool) {
	for _, f := range r.Failures {
		if f.Bench == bench && f.Param == param && f.Mode == mode {
			return f, true
		}
	}
	return Failure{}, false
}

// Summary is the median of several values with their spread.
type Summary struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

// Summarize returns the median, minimum and maximum of vs.
func Summarize(vs []float64) Summary {
	if len(vs) == 0 {
		return Summary{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	return Summary{N: len(s), Median: Quantile(s, 0.5), Min: s[0], Max: s[len(s)-1]}
}

// Quantile returns the q-quantile of sorted values, interpolating linearly between the
// closest ranks.
func Quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	pos := q * float64(len(sorted)-1)
	lo := int(math.Floor(pos))
	hi := min(lo+1, len(sorted)-1)
	return sorted[lo] + (sorted[hi]-sorted[lo])*(pos-float64(lo))
}

// Percentiles returns the given quantiles of values (not necessarily sorted).
func Percentiles(values []float64, qs ...float64) []float64 {
	s := slices.Clone(values)
	slices.Sort(s)
	out := make([]float64, len(qs))
	for i, q := range qs {
		out[i] = Quantile(s, q)
	}
	return out
}

// String prints "median (min–max)" with a precision that suits the magnitude.
func (s Summary) String() string {
	if s.N == 0 {
		return "–"
	}
	if s.N == 1 || s.Min == s.Max {
		return num(s.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", num(s.Median), num(s.Min), num(s.Max))
}

// RatioString prints a ratio summary with two decimals.
func (s Summary) RatioString() string {
	if s.N == 0 {
		return "–"
	}
	if s.N == 1 {
		return fmt.Sprintf("%.2f", s.Median)
	}
	return fmt.Sprintf("%.2f (%.2f–%.2f)", s.Median, s.Min, s.Max)
}

func num(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v):
		return "–"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}
