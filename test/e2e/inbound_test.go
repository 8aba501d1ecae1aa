package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// mode attaches one backend to a pod with the default (Istio injector) policy.
type mode struct {
	name   string
	attach func(t *testing.T, pod *testpod.Pod)
}

var modes = []mode{
	{"ebpf", func(t *testing.T, pod *testpod.Pod) {
		divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	}},
	{"iptables", func(t *testing.T, pod *testpod.Pod) {
		if _, err := iptables.Apply(context.Background(), pod.NetNSPath, divertest.Config(t)); err != nil {
			t.Fatal(err)
		}
	}},
}

// sidecarProxy starts a forwarding proxy as Envoy runs in a pod: uid 1337, outbound on
// 15001, inbound on 15006, forwarding inbound to the app from 127.0.0.6.
func sidecarProxy(t *testing.T, pod *testpod.Pod, name string) {
	pod.StartProxy(t, testpod.ProxyConfig{
		Name: name, Mode: "forward", UID: proxyUID, GID: proxyUID,
		Listen:     []netip.AddrPort{netip.AddrPortFrom(anyAddr, 15001), netip.AddrPortFrom(anyAddr, 15006)},
		InboundSrc: policy.InboundPassthroughSource,
	})
}

// hopSummary is what must be identical between backends: who accepted, on which
// listener, what original destination it read, and (for the app) where it was reached.
func hopSummary(pod *testpod.Pod, h testpod.Hop) string {
	if h.Listener != "" {
		return fmt.Sprintf("%s via %s read %s", h.Who, h.Listener, h.Orig)
	}
	peer, _ := netip.ParseAddrPort(h.Peer)
	return fmt.Sprintf("%s at %s from %s", h.Who, h.Local, peer.Addr())
}

// The whole sidecar path between two pods: app A -> captured outbound -> proxy A ->
// pod B -> captured inbound -> proxy B -> app B via 127.0.0.6. Both backends must show the
// same hops.
func TestSidecarPath(t *testing.T) {
	var paths []string
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			net := testpod.NewNetwork(t)
			a, b := net.AddPod(t), net.AddPod(t)
			m.attach(t, a)
			m.attach(t, b)
			sidecarProxy(t, a, "proxy-a")
			sidecarProxy(t, b, "proxy-b")
			b.Server(t, "app-b", netip.AddrPortFrom(anyAddr, 8080), appUID, appUID)

			dst := netip.AddrPortFrom(b.Addr, 8080)
			res := a.Dial(t, appUID, appUID, testpod.Target{Dst: dst})[0]
			if res.Err != "" || len(res.Hops) != 3 {
				t.Fatalf("app A -> %s: %+v", dst, res)
			}
			var hops []string
			for _, h := range res.Hops {
				hops = append(hops, hopSummary(b, h))
			}
			want := []string{
				fmt.Sprintf("proxy-a via 0.0.0.0:15001 read %s", dst),
				fmt.Sprintf("proxy-b via 0.0.0.0:15006 read %s", dst),
				fmt.Sprintf("app-b at %s from 127.0.0.6", dst),
			}
			if strings.Join(hops, "\n") != strings.Join(want, "\n") {
				t.Fatalf("hops:\n  %s\nwant:\n  %s", strings.Join(hops, "\n  "), strings.Join(want, "\n  "))
			}
			paths = append(paths, strings.Join(hops, " | "))
		})
	}
	if len(paths) == 2 && paths[0] != paths[1] {
		t.Errorf("backends disagree:\n  ebpf:     %s\n  iptables: %s", paths[0], paths[1])
	}
}

// Captured inbound with no proxy listening is refused, as with iptables: never a hang,
// never an escape to the app listening on that port.
func TestInboundNoListenerRefused(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			pod := testpod.New(t)
			m.attach(t, pod)
			pod.Server(t, "app", netip.AddrPortFrom(anyAddr, 8080), appUID, appUID)
			res := pod.Net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(pod.Addr, 8080)})[0]
			if res.Err != "connection refused" {
				t.Fatalf("want connection refused, got %+v", res)
			}
		})
	}
}

// A restarted proxy (a new listener on the same port) is found without re-attaching.
func TestInboundProxyRestart(t *testing.T) {
	pod := testpod.New(t)
	divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	pod.Server(t, "app", netip.AddrPortFrom(anyAddr, 8080), appUID, appUID)
	dst := testpod.Target{Dst: netip.AddrPortFrom(pod.Addr, 8080)}
	inbound := netip.AddrPortFrom(anyAddr, 15006)

	first := pod.Proxy(t, "proxy-1", inbound, "report", proxyUID, proxyUID)
	if res := pod.Net.Dial(t, dst)[0]; len(res.Hops) != 1 || res.Hops[0].Who != "proxy-1" || res.Hops[0].Orig != dst.Dst.String() {
		t.Fatalf("first proxy: %+v", res)
	}
	first.Stop()
	if res := pod.Net.Dial(t, dst)[0]; res.Err != "connection refused" {
		t.Fatalf("while the proxy is down: want connection refused, got %+v", res)
	}
	pod.Proxy(t, "proxy-2", inbound, "report", proxyUID, proxyUID)
	if res := pod.Net.Dial(t, dst)[0]; len(res.Hops) != 1 || res.Hops[0].Who != "proxy-2" || res.Hops[0].Orig != dst.Dst.String() {
		t.Fatalf("restarted proxy: %+v", res)
	}
}

// A proxy with several SO_REUSEPORT listeners (Envoy: one per worker) gets the
// connections, spread over its listeners by the kernel.
func TestInboundReuseport(t *testing.T) {
	const listeners, conns = 4, 64
	pod := testpod.New(t)
	divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: proxyUID, GID: proxyUID,
		Listen: []netip.AddrPort{netip.AddrPortFrom(anyAddr, 15006)}, Reuseport: listeners})
	targets := make([]testpod.Target, conns)
	for i := range targets {
		targets[i] = testpod.Target{Dst: netip.AddrPortFrom(pod.Addr, uint16(8000+i))}
	}
	used := map[int]int{}
	for i, res := range pod.Net.Dial(t, targets...) {
		if len(res.Hops) != 1 || res.Hops[0].Who != "proxy" || res.Hops[0].Orig != targets[i].Dst.String() {
			t.Fatalf("connection %d: %+v", i, res)
		}
		used[res.Hops[0].Index]++
	}
	if len(used) < 2 {
		t.Errorf("all %d connections went to one of %d reuseport listeners: %v", conns, listeners, used)
	}
}

// A proxy that was already listening when divert was attached is found too (pidfd_getfd).
func TestInboundAdoptsExistingListener(t *testing.T) {
	pod := testpod.New(t)
	pod.Proxy(t, "proxy", netip.AddrPortFrom(anyAddr, 15006), "report", proxyUID, proxyUID)
	pod.Server(t, "app", netip.AddrPortFrom(anyAddr, 8080), appUID, appUID)
	divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	dst := testpod.Target{Dst: netip.AddrPortFrom(pod.Addr, 8080)}
	if res := pod.Net.Dial(t, dst)[0]; len(res.Hops) != 1 || res.Hops[0].Who != "proxy" || res.Hops[0].Orig != dst.Dst.String() {
		t.Fatalf("listener from before attach not used: %+v", res)
	}
}
