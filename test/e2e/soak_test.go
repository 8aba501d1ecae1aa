package e2e

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// make test runs a bounded soak; make soak runs 1,000,000 connections.
var (
	soakShort   = flag.Int("soak.short", 20000, "short connections in TestSoak")
	soakLong    = flag.Int("soak.long", 500, "long-lived connections in TestSoak, held open throughout")
	soakWorkers = flag.Int("soak.workers", 8, "app goroutines making TestSoak's short connections")
	soakDocs    = flag.String("soak.docs", "", "if set, write the run's figures to this file (make soak: docs/soak.md)")
)

// Many short connections at full rate through one pod while long-lived ones stay open:
// not one original destination lost or wrong (the long-lived ones are read last, after
// all the churn), no error, the socket storage holding exactly the open connections'
// original destinations, and nothing left once they are closed.
func TestSoak(t *testing.T) {
	pod := testpod.New(t)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	m, err := loader.OpenMaps(pod.Name, att.Opts)
	if err != nil {
		t.Fatal(err)
	}
	defer loader.CloseMaps(m)
	held := func() loader.OrigDstsHeld {
		t.Helper()
		h, err := loader.CountOrigDsts(pod.NetNSPath, m.OrigDstStorage)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}

	kernelBefore := slabKiB(t)
	soak := pod.StartSoak(t, netip.AddrPortFrom(anyAddr, 15001), proxyUID, appUID,
		testpod.SoakConfig{Short: *soakShort, Long: *soakLong, Workers: *soakWorkers})
	soak.Phase("long-open", time.Minute)
	// The proxy may still be accepting the last ones.
	waitHeld(t, held, loader.OrigDstsHeld{App: *soakLong, Proxy: *soakLong})
	kernelLong := slabKiB(t)
	soak.Continue()

	soak.Phase("short-done", 2*time.Hour)
	waitHeld(t, held, loader.OrigDstsHeld{App: *soakLong, Proxy: *soakLong})
	kernelShort := slabKiB(t)

	res := soak.Finish()
	waitHeld(t, held, loader.OrigDstsHeld{})
	t.Logf("soak: %d short connections in %.1f s (%.0f/s, %d workers), %d long-lived held throughout; "+
		"unreclaimable kernel memory %d KiB before, %d with the long-lived open, %d after the short ones (%+d KiB over the churn)",
		*soakShort, res.Seconds, float64(*soakShort)/res.Seconds, *soakWorkers, *soakLong,
		kernelBefore, kernelLong, kernelShort, kernelShort-kernelLong)
	ok := res.ShortOK == *soakShort && res.LongOK == *soakLong
	if *soakDocs != "" && ok {
		writeSoakDoc(t, *soakDocs, res, kernelBefore, kernelLong, kernelShort)
	}
	if !ok {
		t.Fatalf("short: %d ok, %d errors, %d lost; long-lived: %d ok, %d errors, %d lost; e.g. %v",
			res.ShortOK, res.ShortErrors, res.ShortLost, res.LongOK, res.LongErrors, res.LongLost, res.Samples)
	}
	if got, want := att.Counters(t)[policy.ReasonIncludedCIDR], uint64(*soakShort+*soakLong); got != want {
		t.Errorf("included-cidr counted %d, want %d", got, want)
	}
	att.NoDrops(t)
}

// waitHeld waits until the socket storage holds want (connections settle asynchronously).
func waitHeld(t *testing.T, held func() loader.OrigDstsHeld, want loader.OrigDstsHeld) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := held()
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket storage holds %+v original destinations, want %+v", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// slabKiB is the host's unreclaimable slab memory (where socket storage lives), for the log.
func slabKiB(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "SUnreclaim:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no SUnreclaim in /proc/meminfo")
	return 0
}

// writeSoakDoc records a passing run's figures for docs/soak.md.
func writeSoakDoc(t *testing.T, path string, res testpod.SoakResult, before, long, short int) {
	uname, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	load, _ := os.ReadFile("/proc/loadavg")
	doc := fmt.Sprintf(`# Soak

<!-- Written by make soak (test/e2e TestSoak -soak.docs); rerun it rather than editing this file. -->

%s, kernel %s, %d CPUs, load average at the end %s.

One pod, divert's eBPF capture with the injector's policy, the proxy (uid 1337) reading
each original destination only when the app asks for it:

| | |
|---|---|
| short connections | %d in %.1f s (%.0f per second, %d app goroutines), each asking once |
| long-lived connections | %d, opened first, asked last (after all the short ones) |
| original destinations wrong or missing | %d short, %d long-lived |
| connection errors | %d short, %d long-lived |
| socket storage holding an original destination | %d app + %d proxy sockets with only the long-lived open, before and after the churn; 0 once all closed |
| drops counted by the programs | 0 |
| unreclaimable slab (SUnreclaim) | %d KiB before, %d KiB with the long-lived open, %d KiB after the short ones |

The slab grows over the churn by the TIME_WAIT sockets the app's closes leave (a kernel
cost of any million connections, not divert's); the original destinations themselves
live in the sockets' storage, which the count above shows back at exactly the open
connections, then zero.
`, time.Now().UTC().Format("2006-01-02"), strings.TrimSpace(string(uname)), runtime.NumCPU(),
		strings.Join(strings.Fields(string(load))[:3], " "),
		*soakShort, res.Seconds, float64(*soakShort)/res.Seconds, *soakWorkers,
		*soakLong, res.ShortLost, res.LongLost, res.ShortErrors, res.LongErrors,
		*soakLong, *soakLong, before, long, short)
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
}
