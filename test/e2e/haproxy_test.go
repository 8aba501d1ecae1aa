package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// startHAProxy runs Debian's haproxy, unmodified, in the pod as uid 1337 with the given
// configuration and waits until it listens on port.
func startHAProxy(t *testing.T, pod *testpod.Pod, port uint16, config string) *testpod.Proc {
	t.Helper()
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		t.Fatalf("haproxy is required (make deps installs it): %v", err)
	}
	// t.TempDir's parent is 0700: uid 1337 could not read the config there.
	dir, err := os.MkdirTemp("", "divert-haproxy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	pr := pod.Start(t, testpod.ProcSpec{UID: proxyUID, GID: proxyUID, Path: haproxy, Args: []string{"-db", "-f", cfg}})
	waitListening(t, pod.NetNSPath, port)
	return pr
}

// haproxyDualStack listens as Envoy does in dual stack (0.0.0.0 and an IPv6-only [::])
// and logs, per connection, the destination HAProxy took for the original one
// ("dst=" is what its dst fetch, i.e. the server 0.0.0.0:0 forwarding, uses). A
// connection whose destination reads as HAProxy's own listener is refused rather than
// sent back to it, where it would read the same again until maxconn.
const haproxyDualStack = haproxyLogging + `frontend outbound
  bind 0.0.0.0:15001
  bind [::]:15001 v6only
  tcp-request content reject if { dst_port 15001 }
  default_backend original_destination
backend original_destination
  server s 0.0.0.0:0
`

const haproxyLogging = `global
  maxconn 100
  log stdout format raw local0
defaults
  mode tcp
  log global
  log-format "dst=%[dst]:%[dst_port] server=%si:%sp"
  timeout connect 3s
  timeout client 5s
  timeout server 5s
`

// HAProxy in its transparent mode ("server s 0.0.0.0:0") cannot forward a captured native
// IPv6 connection: for an IPv6 socket it takes the accepted socket's own address
// (getsockname) for the original destination and never asks IP6T_SO_ORIGINAL_DST; only
// its IPv4 family asks SO_ORIGINAL_DST (src/sock_inet.c, proto_fam_inet6.get_dst is
// sock_get_dst, in 2.6 as in 3.x). So after istio's REDIRECT to [::1]:15001 it reads
// [::1]:15001, itself. The same happens under istio's ip6tables rules (the oracle) as
// under divert, while IPv4 from the same dual-stack pod lands on its server: this is
// HAProxy's limit, not the capture's (docs/semantics.md). A HAProxy that asks fails this
// test: then it works outbound too, and the docs should say so.
func TestHAProxyIPv6ReadsOnlyItsOwnAddress(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	pod.Net.Server(t, "remote", ap(any6, 80)) // dual-stack: both families
	dst4, dst6 := ap(pod.Net.Addrs[0], 80), ap(pod.Net.Addrs6[0], 80)
	cfg := ipv6Config(t)

	check := func(t *testing.T) {
		t.Helper()
		ha := startHAProxy(t, pod, 15001, haproxyDualStack)
		res := pod.Dial(t, appUID, appUID, testpod.Target{Dst: dst4}, testpod.Target{Dst: dst6})
		if r := res[0]; r.Err != "" || len(r.Hops) != 1 || r.Hops[0].Who != "remote" || r.Hops[0].Local != dst4.String() {
			t.Errorf("app -> %s through haproxy: want the remote server answering there, got %+v", dst4, r)
		}
		if r := res[1]; len(r.Hops) != 0 {
			t.Errorf("app -> %s: haproxy forwarded it somewhere after all: %+v", dst6, r)
		}
		// Both connections reached HAProxy (one log line each); what it read for them:
		// the IPv4 original destination, and for IPv6 its own listener, [::1]:15001.
		want := []string{
			fmt.Sprintf("dst=%s:%d server=%s:%d", dst4.Addr(), dst4.Port(), dst4.Addr(), dst4.Port()),
			"dst=::1:15001 server=-:-",
		}
		got := haproxyLog(t, ha, len(want))
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("haproxy logged\n  %q\nwant\n  %q", got, want)
		}
	}

	t.Run("ebpf", func(t *testing.T) {
		att := divertest.Attach(t, pod, divertest.BPFFS(t), cfg)
		check(t)
		// The capture did its part: the app's IPv6 connect was redirected, and the
		// original destination was there to read with IP6T_SO_ORIGINAL_DST
		// (TestIPv6Outbound reads it); HAProxy never asked.
		if n := att.CountersByFamily(t, maps.IPv6)[policy.ReasonIncludedCIDR]; n != 1 {
			t.Errorf("IPv6 included-cidr counted %d, want 1 (the app's connection)", n)
		}
		att.NoDrops(t)
	})
	for _, b := range divertest.IPTablesBackends {
		t.Run("iptables-"+b.String(), func(t *testing.T) {
			divertest.ApplyIPTables(t, pod, b, cfg)
			check(t)
		})
	}
}

// HAProxy as the inbound proxy on an IPv6-only [::]:15006, forwarding to the
// destination it reads, from ::6 as Envoy does. Inbound, divert needs no
// IP6T_SO_ORIGINAL_DST: sk_lookup hands the connection over untranslated, so the accepted
// socket's own address is the original destination (as with TPROXY) and HAProxy's
// getsockname reads it. istio's ip6tables REDIRECT makes that address <pod IP>:15006, so
// there HAProxy reads its own listener again, and the connection never reaches the app
// (docs/semantics.md: inbound local address).
func TestHAProxyIPv6Inbound(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	pod.Server(t, "app", ap(any6, 8080), appUID, appUID)
	dst := ap(pod.Addr6, 8080)
	cfg := ipv6Config(t)
	config := haproxyLogging + `frontend inbound
  bind [::]:15006 v6only
  tcp-request content reject if { dst_port 15006 }
  default_backend inbound_passthrough
backend inbound_passthrough
  source [::6]
  server s [::]:0
`
	t.Run("ebpf", func(t *testing.T) {
		att := divertest.Attach(t, pod, divertest.BPFFS(t), cfg)
		ha := startHAProxy(t, pod, 15006, config)
		vc := divertest.NewVerdictCheck(t, att)
		vc.Begin(t, cfg)
		res := pod.Net.Dial(t, testpod.Target{Dst: dst})[0]
		if res.Err != "" || len(res.Hops) != 1 || res.Hops[0].Who != "app" || res.Hops[0].Local != dst.String() ||
			!strings.HasPrefix(res.Hops[0].Peer, "[::6]:") {
			t.Errorf("remote -> %s through haproxy: want the app answering there to ::6, got %+v", dst, res)
		}
		want := fmt.Sprintf("dst=%s:%d server=%s:%d", dst.Addr(), dst.Port(), dst.Addr(), dst.Port())
		if got := haproxyLog(t, ha, 1); len(got) != 1 || got[0] != want {
			t.Errorf("haproxy logged %q, want %q", got, want)
		}
		// Exactly one inbound connection captured and haproxy's passed from ::6, counted as
		// IPv6 (sk_lookup may run twice for one connection: divertest.VerdictCheck).
		decided := vc.Check(t, []policy.Reason{policy.ReasonInboundIncludedPort, policy.ReasonInboundPassthrough}, "remote -> pod")
		wantDecided := []string{fmt.Sprintf("inbound-included-port to %s", dst), fmt.Sprintf("inbound-passthrough to %s from ::6", dst)}
		if got := decisions(decided); !slices.Equal(got, slices.Sorted(slices.Values(wantDecided))) {
			t.Errorf("decided\n  %q\nwant\n  %q", got, wantDecided)
		}
		att.NoDrops(t)
	})
	for _, b := range divertest.IPTablesBackends {
		t.Run("iptables-"+b.String(), func(t *testing.T) {
			divertest.ApplyIPTables(t, pod, b, cfg)
			ha := startHAProxy(t, pod, 15006, config)
			res := pod.Net.Dial(t, testpod.Target{Dst: dst})[0]
			if len(res.Hops) != 0 {
				t.Errorf("remote -> %s: haproxy forwarded it somewhere after all: %+v", dst, res)
			}
			want := fmt.Sprintf("dst=%s:15006 server=-:-", pod.Addr6)
			if got := haproxyLog(t, ha, 1); len(got) != 1 || got[0] != want {
				t.Errorf("haproxy logged %q, want %q", got, want)
			}
		})
	}
}

// haproxyLog waits for n lines of HAProxy's log on its stdout.
func haproxyLog(t *testing.T, ha *testpod.Proc, n int) []string {
	t.Helper()
	var lines []string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		lines = strings.Split(strings.TrimSpace(ha.Stdout()), "\n")
		if len(lines) >= n && lines[0] != "" {
			return lines
		}
	}
	t.Fatalf("haproxy logged %q, want %d lines", ha.Stdout(), n)
	return nil
}
