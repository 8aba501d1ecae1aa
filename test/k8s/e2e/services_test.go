package e2e

import (
	"slices"
	"testing"
	"time"

	"github.com/meshdivert/divert/test/k8s/e2e/cluster"
)

// ClusterIP Services through kube-proxy, in both of its Linux modes. A meshed app dials a
// Service's address, not a pod's: capture must happen before kube-proxy translates it (the
// proxy reads the Service address as the original destination and dials it itself), and
// the translation must still happen for the proxy's own dial. Inbound, kube-proxy has
// already translated the address when the connection reaches the pod.

// proxyModes in the order TestServices runs them; other tests start from whatever mode
// the previous one left, to switch as little as possible.
var proxyModes = []string{cluster.ProxyIPTables, cluster.ProxyNFTables}

// useProxyMode switches kube-proxy to mode and waits until it serves every test Service.
func useProxyMode(t *testing.T, mode string) {
	t.Helper()
	start := time.Now()
	if err := suite.c.SetProxyMode(ctx, mode); err != nil {
		t.Fatal(err)
	}
	var vips []string
	for _, ip := range serviceIPs {
		vips = append(vips, ip)
	}
	if err := suite.c.WaitFor(ctx, "kube-proxy ("+mode+") serving the test Services", 30*time.Second, func() error {
		return suite.c.ProxyServes(vips...)
	}); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Logf("kube-proxy now in %s mode (%s)", mode, d.Round(100*time.Millisecond))
	}
}

// modesFromCurrent is proxyModes starting with the mode kube-proxy runs in now.
func modesFromCurrent() []string {
	m := slices.Clone(proxyModes)
	if m[0] != suite.c.ProxyMode() {
		slices.Reverse(m)
	}
	return m
}

// TestServices runs the Service rows for the init-container pods, eBPF (mesh-a) and
// istio's iptables rules (mesh-ipt) side by side, in each kube-proxy mode. Node mode's
// pod gets the same rows in TestNodeMode.
func TestServices(t *testing.T) {
	for _, mode := range proxyModes {
		t.Run("kube-proxy-"+mode, func(t *testing.T) {
			useProxyMode(t, mode)
			serviceRows(t, "ebpf", meshA, addr(meshA, appPort))
			serviceRows(t, "iptables", meshIpt, addr(meshIpt, inboundPrt))
		})
	}
}

// serviceRows are the three paths through a Service for one meshed pod. inLocal is the
// proxy's local address for inbound (see inbound: it tells which backend captured).
func serviceRows(t *testing.T, label, pod, inLocal string) {
	t.Run(label+"/app-to-service", func(t *testing.T) { appToService(t, pod) })
	t.Run(label+"/proxy-to-own-service", func(t *testing.T) { proxyToOwnService(t, pod, inLocal) })
	t.Run(label+"/unmeshed-to-service", func(t *testing.T) { unmeshedToService(t, pod, inLocal) })
}

// appToService: app → plain's Service address → captured to the proxy, which reads the
// Service address (not a backend's) as the original destination → the proxy dials it →
// kube-proxy translates → plain, which sees its own pod address and port as the local
// address and the meshed pod's address as the peer.
func appToService(t *testing.T, pod string) {
	r := scenario(t)
	expect(t, r, pod, "app", vip(plainName),
		want{who: pod + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: vip(plainName)},
		want{who: plainName, local: addr(plainName, appPort), peerIP: suite.ips[pod]})
}

// proxyToOwnService: the proxy (uid 1337) dials its own pod's Service. Its dial is not
// captured (the proxy's uid); kube-proxy translates it to the pod's own address and, as the
// source is the backend itself, masquerades it to the bridge's address (its hairpin rule),
// so the connection comes back into the pod from outside and inbound capture hands it to
// 15006 — where istio's rule for a proxy reaching its own pod (uid 1337, -o lo, to the
// inbound port) also sends a dial to the pod's own address. The proxy then forwards to its
// app from 127.0.0.6.
func proxyToOwnService(t *testing.T, pod, inLocal string) {
	r := scenario(t)
	expect(t, r, pod, "proxy", vip(pod),
		want{who: pod + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(pod, appPort), local: inLocal, peerIP: cluster.PodGateway},
		want{who: pod + "-app", peerIP: "127.0.0.6"})
}

// unmeshedToService: an unmeshed pod dials the meshed pod's Service; kube-proxy translates
// on the way, and the meshed pod's inbound capture takes the connection to its proxy with
// the pod address (what arrives) as the original destination.
func unmeshedToService(t *testing.T, pod, inLocal string) {
	r := scenario(t)
	expect(t, r, plainName, "app", vip(pod),
		want{who: pod + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(pod, appPort), local: inLocal, peerIP: suite.ips[plainName]},
		want{who: pod + "-app", peerIP: "127.0.0.6"})
}

// nodeServices: node mode's pod, captured by the agent, through Services in each
// kube-proxy mode (starting with the one running, to switch once).
func nodeServices(t *testing.T) {
	for _, mode := range modesFromCurrent() {
		t.Run("kube-proxy-"+mode, func(t *testing.T) {
			useProxyMode(t, mode)
			serviceRows(t, "ebpf", nodeMesh, addr(nodeMesh, appPort))
		})
	}
}
