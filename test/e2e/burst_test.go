package e2e

import (
	"flag"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
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
		checkBurst(t, att, res, n)
	})
	// IPv6's original destination does not fit beside the SYN's options and rides on the
	// handshake's ACK: the same burst to as many IPv6 destinations.
	t.Run("ebpf-ipv6", func(t *testing.T) {
		pod := testpod.NewStack(t, testpod.IPv6Only)
		att := divertest.Attach(t, pod, divertest.BPFFS(t), ipv6Config(t))
		res := pod.BurstWith(t, testpod.BurstConfig{Addrs: pod.Net.Addrs6, Proxy: netip.AddrPortFrom(any6, 15001),
			ProxyID: proxyUID, AppID: appUID, Count: n})
		checkBurst(t, att, res, n)
		if got := att.CountersByFamily(t, maps.IPv6)[policy.ReasonIncludedCIDR]; got != uint64(n) {
			t.Errorf("IPv6 included-cidr counted %d, want %d", got, n)
		}
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

// checkBurst requires every connection of a burst of n to have reached the proxy with its
// own original destination, counted once, nothing dropped.
func checkBurst(t *testing.T, att *divertest.Attached, res testpod.BurstResult, n int) {
	t.Helper()
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
}

// A proxy that accepts slowly (one connection every 200 ms) from a short queue (backlog
// 8) while an app opens 40 connections at once, half of them IPv6, and writes to each: the
// accept queue overflows, so SYNs are dropped and sent again, and final ACKs are dropped
// (the app's side is established, the proxy's not) and the handshake is completed later by
// the app's data or its ACK of a retransmitted SYN-ACK. The segment that finally
// establishes the proxy's socket must carry the original destination, in both families
// (IPv4's can ride on the SYN, IPv6's never does). Writing IPv6's option on the first ACK
// only loses about half of the IPv6 ones here. SYN cookies are off in the pod: with them, handshakes whose cookie ACK met
// a full queue stalled for good, with no BPF program loaded at all (the kernel kept counting
// ListenOverflows while accept() found nothing).
func TestBurstOverflowingAcceptQueue(t *testing.T) {
	const n = 40
	pod := testpod.NewStack(t, testpod.DualStack)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), ipv6Config(t))
	if err := nsexec.Do(pod.NetNSPath, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/tcp_syncookies", []byte("0\n"), 0)
	}); err != nil {
		t.Fatal(err)
	}
	// Both families at once, one connection in two each.
	addrs := append(slices.Clone(pod.Net.Addrs), pod.Net.Addrs6...)
	res := pod.BurstWith(t, testpod.BurstConfig{Addrs: addrs, Proxy: netip.AddrPortFrom(any6, 15001),
		ProxyID: proxyUID, AppID: appUID, Count: n, Backlog: 8, AcceptEvery: 200 * time.Millisecond})
	overflows := listenOverflows(t, pod)
	t.Logf("app settled in %v, %d listen overflows", res.Settle.Round(time.Millisecond), overflows)
	if overflows == 0 {
		t.Fatal("the accept queue never overflowed: nothing was established late")
	}
	checkBurst(t, att, res, n)
	for _, f := range []maps.Family{maps.IPv4, maps.IPv6} {
		if got := att.CountersByFamily(t, f)[policy.ReasonIncludedCIDR]; got != n/2 {
			t.Errorf("%s included-cidr counted %d, want %d", f, got, n/2)
		}
	}
}

// listenOverflows is the pod's TcpExt ListenOverflows: final ACKs and SYNs a listener
// dropped because its accept queue was full.
func listenOverflows(t *testing.T, pod *testpod.Pod) int {
	t.Helper()
	var b []byte
	err := nsexec.Do(pod.NetNSPath, func() (err error) {
		b, err = os.ReadFile("/proc/thread-self/net/netstat")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// Pairs of lines: "TcpExt: names..." then "TcpExt: values...".
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		for j, name := range names {
			if name == "ListenOverflows" && j < len(values) && names[0] == "TcpExt:" {
				n, _ := strconv.Atoi(values[j])
				return n
			}
		}
	}
	t.Fatal("no TcpExt ListenOverflows in /proc/net/netstat")
	return 0
}
