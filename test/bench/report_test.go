package bench

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// These tests need no privilege: they check the statistics and the report on made-up
// results, so `make test` covers what `make bench` prints.

func TestQuantile(t *testing.T) {
	s := []float64{1, 2, 3, 4, 5}
	for _, c := range []struct{ q, want float64 }{{0, 1}, {0.5, 3}, {1, 5}, {0.25, 2}, {0.9, 4.6}} {
		if got := Quantile(s, c.q); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("Quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	if !math.IsNaN(Quantile(nil, 0.5)) {
		t.Error("Quantile of nothing should be NaN")
	}
	sum := Summarize([]float64{3, 1, 2})
	if sum.Median != 2 || sum.Min != 1 || sum.Max != 3 || sum.N != 3 {
		t.Errorf("Summarize = %+v", sum)
	}
	if got := sum.String(); got != "2.00 (1.00–3.00)" {
		t.Errorf("String = %q", got)
	}
}

// Ratios pair the modes round by round: a round's drift hits both.
func TestRatioPairsRounds(t *testing.T) {
	var r Results
	for round, v := range []float64{100, 200, 400} { // the machine got slower each round
		r.Add(B1, P50, 0, EBPF, round, v*0.9)
		r.Add(B1, P50, 0, NFT, round, v)
	}
	got := r.Ratio(B1, P50, 0, EBPF, NFT)
	if math.Abs(got.Median-0.9) > 1e-9 || math.Abs(got.Max-0.9) > 1e-9 {
		t.Errorf("ratio = %+v, want 0.9 in every round", got)
	}
	if v := verdict(r.Ratios(B1, P50, 0, EBPF, NFT), true, NFT); v != "eBPF better than iptables-nft in all 3 rounds" {
		t.Errorf("verdict = %q", v)
	}
	if v := verdict([]float64{0.9, 1.1, 0.8}, true, NFT); v != "eBPF better than iptables-nft in 2 of 3 rounds" {
		t.Errorf("verdict = %q", v)
	}
	if v := verdict([]float64{0.9, 1.1, 0.8}, false, Explicit); v != "eBPF better than explicit in 1 of 3 rounds" {
		t.Errorf("verdict = %q", v)
	}
}

func TestReport(t *testing.T) {
	res := fakeResults()
	dir := t.TempDir()
	docs := t.TempDir()
	if err := Write(res, dir, docs); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"results.json", "results.md", plotB1, plotB4} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
	for _, f := range []string{"benchmarks.md", docsPrefix + plotB1, docsPrefix + plotB4} {
		if _, err := os.Stat(filepath.Join(docs, f)); err != nil {
			t.Error(err)
		}
	}
	md, err := os.ReadFile(filepath.Join(docs, "benchmarks.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"| p50 µs | 100 (90.0–110) | 300 | 330 | 360 | 390 | 0.92 | 1.10 |", // B1 row with both ratios
		"B1 connection setup p50: ebpf/iptables-nft = 0.92",
		"| 10000 |", "not installable",
		"![B4 scaling](bench-b4-scaling.png)",
		"| ebpf | 100 | 11–100 |",
		"`make bench`",
		"Linux test",
	} {
		if !strings.Contains(string(md), want) {
			t.Errorf("benchmarks.md lacks %q:\n%s", want, md)
		}
	}
}

func fakeResults() *Results {
	res := &Results{
		Machine: Machine{CPUs: 2, CPU: "test CPU", Kernel: "Linux test"},
		Command: "make bench",
		Params:  Params{Rounds: 1, B4Ns: []int{0, 10000}, B5Pods: []int{1, 10, 100}, MsgSize: msgSize},
		B1Latencies: map[Mode][]float64{
			Direct: {90, 100, 110}, Explicit: {290, 300, 310}, EBPF: {320, 330, 340}, NFT: {350, 360, 370}, Legacy: {380, 390, 400},
		},
		B5Memlock: map[string]int64{"map ports": 4096},
	}
	for i, m := range AllModes {
		v := 300 + 30*float64(i-1)
		if m == Direct {
			res.Add(B1, P50, 0, m, 0, 90)
			res.Add(B1, P50, 0, m, 1, 100)
			res.Add(B1, P50, 0, m, 2, 110)
		} else {
			res.Add(B1, P50, 0, m, 0, v)
		}
		res.Add(B2, ConnRate, 0, m, 0, 1000-v)
		for _, n := range res.Params.B4Ns {
			for _, kind := range []string{B4CIDRs, B4Ports} {
				if kind == B4Ports && n == 10000 && m == EBPF {
					res.Failures = append(res.Failures, Failure{kind, n, m, "too big"})
					continue
				}
				res.Add(kind, P50, n, m, 0, v+float64(n)/100)
			}
		}
	}
	for _, m := range []Mode{EBPF, NFT, Legacy} {
		from := 1
		for _, k := range res.Params.B5Pods {
			c := PodCost{Mode: m, Pods: k, From: from, Attach: Summarize([]float64{10}), Detach: Summarize([]float64{1})}
			if m == EBPF {
				c.Memlock, c.MapBytes, c.ProgByte = int64(k)<<20, int64(k)<<19, int64(k)<<19
			}
			res.B5 = append(res.B5, c)
			from = k + 1
		}
	}
	return res
}
