// Package e2e holds end-to-end tests of divert on simulated pods with real proxies.
package e2e

import (
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested()
	os.Exit(m.Run())
}

const (
	proxyUID = divertest.ProxyUID
	appUID   = divertest.AppUID
)

var anyAddr = netip.IPv4Unspecified()

// HAProxy, unmodified, as Istio's proxy would be: uid 1337 on 15001, forwarding to
// "server s 0.0.0.0:0", i.e. to the original destination it reads with SO_ORIGINAL_DST.
// An app in the pod reaches a server in the remote netns through it.
func TestHAProxyTransparentProxy(t *testing.T) {
	pod := testpod.New(t)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	pod.Net.Server(t, "remote", netip.AddrPortFrom(anyAddr, 80))

	startHAProxy(t, pod, 15001, `global
  maxconn 100
defaults
  mode tcp
  timeout connect 3s
  timeout client 5s
  timeout server 5s
frontend outbound
  bind 0.0.0.0:15001
  default_backend original_destination
backend original_destination
  server s 0.0.0.0:0
`)

	before := att.Counters(t)
	dst := netip.AddrPortFrom(pod.Net.Addrs[0], 80)
	res := pod.Dial(t, appUID, appUID, testpod.Target{Dst: dst})[0]
	if res.Err != "" || len(res.Hops) != 1 {
		t.Fatalf("app -> %s through haproxy: %+v", dst, res)
	}
	hop := res.Hops[0]
	if hop.Who != "remote" || hop.Local != dst.String() {
		t.Fatalf("the remote server should have answered at %s, got %+v", dst, hop)
	}
	if !strings.HasPrefix(hop.Peer, pod.Addr.String()+":") {
		t.Errorf("the server's peer should be the pod (haproxy dialling out), got %s", hop.Peer)
	}
	after := att.Counters(t)
	// One connection redirected (the app's), one passed (haproxy's own, as uid 1337).
	if d := after[policy.ReasonIncludedCIDR] - before[policy.ReasonIncludedCIDR]; d != 1 {
		t.Errorf("included-cidr counter moved by %d, want 1 (the app's connection was not redirected?)", d)
	}
	if d := after[policy.ReasonProxyUID] - before[policy.ReasonProxyUID]; d != 1 {
		t.Errorf("proxy-uid counter moved by %d, want 1 (haproxy's upstream connection)", d)
	}
}

// Many sequential connections, each reaching the proxy with its own original destination,
// and nothing given up on. (Nothing to leak: the original destination lives in the two
// sockets' storage and the kernel frees it with them.)
func TestManyConnectionsNoDrops(t *testing.T) {
	const conns = 10000
	pod := testpod.New(t)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	pod.Proxy(t, "proxy", netip.AddrPortFrom(anyAddr, 15001), "report", proxyUID, proxyUID)

	targets := make([]testpod.Target, conns)
	for i := range targets {
		// Spread over the remote addresses and ports so each has its own destination.
		targets[i] = testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[i%len(pod.Net.Addrs)], uint16(1000+i%5000))}
	}
	results := pod.Dial(t, appUID, appUID, targets...)
	for i, r := range results {
		if r.Err != "" || len(r.Hops) != 1 || r.Hops[0].Orig != targets[i].Dst.String() {
			t.Fatalf("connection %d to %s: %+v", i, targets[i].Dst, r)
		}
	}
	if n := att.Counters(t)[policy.ReasonIncludedCIDR]; n != conns {
		t.Fatalf("included-cidr counter = %d, want %d", n, conns)
	}
	att.NoDrops(t)
}

// waitListening polls until something in the netns listens on the TCP port.
func waitListening(t *testing.T, netns string, port uint16) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		out, err := nsexec.CombinedOutput(netns, exec.Command("ss", "-Hltn", "sport = :"+itoa(port)))
		if err == nil && strings.TrimSpace(string(out)) != "" {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nothing listens on port %d", port)
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

// UDP is not captured: a connected UDP socket keeps its destination and nothing is counted.
func TestUDPNotCaptured(t *testing.T) {
	pod := testpod.New(t)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	dst := netip.AddrPortFrom(pod.Net.Addrs[0], 53)
	before := att.Counters(t)
	out := pod.Start(t, testpod.ProcSpec{UID: appUID, GID: appUID, Args: []string{"udp", dst.String()}}).Wait(t, 5*time.Second)
	if got := strings.TrimSpace(out); got != dst.String() {
		t.Errorf("UDP socket connected to %q, want %s (untouched)", got, dst)
	}
	after := att.Counters(t)
	for r, n := range after {
		if n != before[r] {
			t.Errorf("counter %s moved from %d to %d for a UDP connect", r, before[r], n)
		}
	}
}
