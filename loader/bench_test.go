package loader_test

import (
	"context"
	"net/netip"
	"runtime/pprof"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// BenchmarkAttach measures loader.Attach on one pod, as node mode pays it for every pod
// (and again for every pod when the agent restarts). Needs root. Pods (netns + cgroup) are
// made, and new ones detached, outside the timer; the attach itself runs under the pprof
// label op=attach, so a CPU profile of the run can be cut down to it:
//
//	go test -run '^$' -bench Attach -benchtime 100x -cpuprofile cpu.out ./loader/
//	go tool pprof -tagfocus op=attach loader.test cpu.out
//
// Besides ns/op it reports cpu-ms/op: the process's user+system CPU time, which a busy
// machine inflates much less than the wall time.
//
//   - new: a pod seen for the first time (create: its maps made and put in a slot, the
//     node's programs (loaded once, before the timer) attached, its sk_lookup loaded,
//     pins renamed into place).
//   - new-listener: the same with the proxy already listening on the inbound port, so the
//     listener is adopted (found in the netns and borrowed with pidfd_getfd).
//   - update: the same pod again (the agent's refresh), its programs this build's: maps
//     rewritten in place, listeners adopted, no program loaded.
//   - update-swap: the same, each time by the other of two builds (an upgrade, the builds'
//     programs loaded once before the timer): the pod's programs swapped in with
//     link.Update, its sk_lookup loaded for its slot.
func BenchmarkAttach(b *testing.B) {
	b.Run("new", func(b *testing.B) { benchAttach(b, false, false, false) })
	b.Run("new-listener", func(b *testing.B) { benchAttach(b, true, false, false) })
	b.Run("update", func(b *testing.B) { benchAttach(b, true, true, false) })
	b.Run("update-swap", func(b *testing.B) { benchAttach(b, true, true, true) })
}

func benchAttach(b *testing.B, listener, update, swap bool) {
	opts := divertest.BPFFS(b)
	var net *testpod.Network
	var pods int
	newPod := func() *testpod.Pod {
		if net == nil || pods == 254 { // testpod's limit per network
			net, pods = testpod.NewNetwork(b), 0
		}
		pods++
		p := net.AddPod(b)
		if listener {
			any := netip.IPv4Unspecified()
			p.StartProxy(b, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: divertest.ProxyUID, GID: divertest.ProxyUID,
				Listen: []netip.AddrPort{netip.AddrPortFrom(any, 15001), netip.AddrPortFrom(any, 15006)}})
		}
		return p
	}
	cfg := divertest.Config(b)
	attach := func(p *testpod.Pod) {
		lp := loader.Pod{ID: p.Name, Cgroup: p.CgroupPath, NetNS: p.NetNSPath}
		var err error
		pprof.Do(context.Background(), pprof.Labels("op", "attach"), func(ctx context.Context) {
			err = loader.Attach(ctx, lp, cfg, opts)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	// The node's programs, as the first pod on the node (or the agent) loads them.
	defer loader.SetBuildTag("")
	for _, tag := range []string{"bench-other", ""} {
		if !swap && tag != "" {
			continue
		}
		loader.SetBuildTag(tag)
		if err := loader.Probe(opts); err != nil {
			b.Fatal(err)
		}
	}
	var p *testpod.Pod
	if update {
		p = newPod()
		attach(p)
		b.Cleanup(func() { loader.Detach(p.Name, opts) })
	}
	var cpu time.Duration
	var wall time.Duration
	b.ResetTimer()
	b.StopTimer()
	for i := range b.N {
		if !update {
			p = newPod()
		}
		if swap && i%2 == 0 {
			loader.SetBuildTag("bench-other")
		} else if swap {
			loader.SetBuildTag("")
		}
		start, cpu0 := time.Now(), cpuTime()
		b.StartTimer()
		attach(p)
		b.StopTimer()
		wall += time.Since(start)
		cpu += cpuTime() - cpu0
		if !update {
			if err := loader.Detach(p.Name, opts); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(cpu.Microseconds())/1e3/float64(b.N), "cpu-ms/op")
	b.ReportMetric(float64(wall.Microseconds())/1e3/float64(b.N), "wall-ms/op")
}

// cpuTime is the user and system CPU time this process has used so far.
func cpuTime() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
