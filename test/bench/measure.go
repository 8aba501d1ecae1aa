package bench

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// How bench-load and bench-dnsq measure: operations timed one by one on one thread, or
// counted over a window on several; the CPU time of the pod's cgroups over the same window.

// cpuDirs are the cgroups whose CPU time bench-load reports.
var cpuDirs []string

// cpuUsage sums usage_usec of cpuDirs' cpu.stat: exact scheduler time of every task in them
// (cpu.stat has it whether or not the cpu controller is enabled), including softirq work
// done while they ran.
func cpuUsage() (int64, error) {
	var total int64
	for _, d := range cpuDirs {
		b, err := os.ReadFile(filepath.Join(d, "cpu.stat"))
		if err != nil {
			return 0, err
		}
		found := false
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
				n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				if err != nil {
					return 0, err
				}
				total += n
				found = true
			}
		}
		if !found {
			return 0, fmt.Errorf("%s/cpu.stat: no usage_usec", d)
		}
	}
	return total, nil
}

// cpuMeter measures the CPU time of cpuDirs between start and stop.
type cpuMeter struct{ t0 int64 }

func (m *cpuMeter) start() { m.t0, _ = cpuUsage() }
func (m *cpuMeter) stop() int64 {
	t1, _ := cpuUsage()
	return t1 - m.t0
}

// tally collects outcomes; it is not safe for concurrent use.
type tally struct{ LoadResult }

func (t *tally) add(wrongPath bool, err error) {
	switch {
	case err != nil:
		t.Errors++
		if t.FirstErr == "" {
			t.FirstErr = err.Error()
		}
	case wrongPath:
		t.WrongPath++
		t.Conns++
	default:
		t.Conns++
	}
}

// parseWithCgroups adds --cgroups to fs and parses args: those cgroups become the ones
// whose CPU time is reported (cpuDirs), once it is known that it can be read.
func parseWithCgroups(fs *flag.FlagSet, args []string) error {
	cgroups := fs.String("cgroups", "", "comma-separated cgroup v2 directories whose CPU time to report")
	if err := fs.Parse(args); err != nil || *cgroups == "" {
		return err
	}
	cpuDirs = strings.Split(*cgroups, ",")
	_, err := cpuUsage()
	return err
}

// sequential calls op warmup+n times on this thread and times each call; the measured
// window (latencies, CPU time, seconds) starts after the warm-up. Outcomes are tallied;
// with stopOnErr the first error ends the run.
func sequential(warmup, n int, stopOnErr bool, op func(i int) (wrongPath bool, err error)) LoadResult {
	runtime.LockOSThread()
	var t tally
	t.LatNS = make([]int64, 0, n)
	var cpu cpuMeter
	var start0 time.Time
	for i := range warmup + n {
		if i == warmup {
			cpu.start()
			start0 = time.Now()
		}
		start := time.Now()
		wrong, err := op(i)
		d := time.Since(start)
		t.add(wrong, err)
		if err != nil && stopOnErr {
			break
		}
		if i >= warmup && err == nil {
			t.LatNS = append(t.LatNS, int64(d))
		}
	}
	if !start0.IsZero() {
		t.Seconds = time.Since(start0).Seconds()
	}
	t.CPUMicros = cpu.stop()
	t.Count = int64(len(t.LatNS))
	return t.LoadResult
}

// parallel runs clients threads, each calling its own op (from newOp) again and again:
// warmupOps calls each and then warmupDur more are discarded, then the calls that succeed
// within duration are counted. A failed warm-up call ends its client: a broken path fails
// the run, it must not hang it.
func parallel(clients, warmupOps int, warmupDur, duration time.Duration, newOp func() func(i int) (wrongPath bool, err error)) LoadResult {
	var measuring, stop atomic.Bool
	tallies := make([]tally, clients)
	counts := make([]int64, clients)
	var ready, wg sync.WaitGroup
	for c := range clients {
		ready.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			op := newOp()
			for i := 0; !stop.Load(); i++ {
				if i == warmupOps {
					ready.Done()
				}
				m := measuring.Load()
				wrong, err := op(i)
				tallies[c].add(wrong, err)
				if m && err == nil && !stop.Load() {
					counts[c]++
				}
				if err != nil && i < warmupOps {
					ready.Done()
					return
				}
			}
		}()
	}
	ready.Wait()
	time.Sleep(warmupDur)
	var cpu cpuMeter
	cpu.start()
	measuring.Store(true)
	start := time.Now()
	time.Sleep(duration)
	stop.Store(true)
	elapsed := time.Since(start)
	res := LoadResult{CPUMicros: cpu.stop(), Seconds: elapsed.Seconds()}
	wg.Wait()
	for c := range clients {
		res.Conns += tallies[c].Conns
		res.Errors += tallies[c].Errors
		res.WrongPath += tallies[c].WrongPath
		if res.FirstErr == "" {
			res.FirstErr = tallies[c].FirstErr
		}
		res.Count += counts[c]
	}
	return res
}
