package e2e

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// Dual stack (issue 15 item 6): the cluster gives every pod an IPv4 and an IPv6 address
// (cluster.PodCIDR6), IPv4 first. A pod with ISTIO_DUAL_STACK=true (the mesh's
// proxyMetadata, which Istio's injector puts into istio-init's and istio-proxy's
// environment) is captured in both families; its proxy listens on 0.0.0.0 and [::] (IPv6
// only), as Envoy does in dual stack, and forwards inbound from 127.0.0.6 or ::6.
const (
	dsPlain = "ds-plain" // unmeshed, [::]:8080 (dual-stack socket)
	dsEBPF  = "ds-ebpf"  // divert as istio-init, Istio's template, eBPF
	dsIpt   = "ds-ipt"   // the same with --mode iptables: istio's ip6tables rules
	nodeDS  = "node-ds"  // node mode: no divert container (node_test.go)
)

// ips6 holds the dual-stack pods' IPv6 addresses (.status.podIPs[1]).
var ips6 = map[string]string{}

// addr6 is [pod IPv6]:port. It never panics (a panic skips TestMain's teardown): an
// unknown pod gives an address the client refuses, and the row fails.
func addr6(pod, port string) string {
	return "[" + ips6[pod] + "]:" + port
}

// dsProxy is the proxy of a dual-stack pod: IPv4 and IPv6-only listeners on both ports,
// one inbound passthrough source per family.
func dsProxy(ctrName, name string) obj {
	c := container(ctrName, proxyUID, "proxy", "--name", name+"-proxy", "--mode", "forward",
		"--inbound-src", "127.0.0.6", "--inbound-src", "::6", "--v6only",
		"--listen", "0.0.0.0:"+outboundPrt, "--listen", "0.0.0.0:"+inboundPrt,
		"--listen", "[::]:"+outboundPrt, "--listen", "[::]:"+inboundPrt)
	setEnv(c, "ISTIO_DUAL_STACK", "true")
	return c
}

// dsApp listens on a dual-stack [::] socket (Go reports its v4-mapped IPv4 peers as IPv4).
func dsApp(name string) obj {
	return container("app", appUID, "server", "--name", name+"-app", "--listen", "[::]:"+appPort)
}

// dsInitPod is meshedPod (Istio's template) with ISTIO_DUAL_STACK=true in istio-init's
// environment and the dual-stack proxy and app.
func dsInitPod(name string, b backend) obj {
	p := meshedPod(name, b, istioTemplate, outboundPrt, suite.c.BPFFS)
	spec := p["spec"].(obj)
	setEnv(spec["initContainers"].([]obj)[0], "ISTIO_DUAL_STACK", "true")
	spec["containers"] = []obj{dsProxy("proxy", name), dsApp(name)}
	return p
}

// podIPs fills suite.ips and ips6 for the pods and fails unless each has one address per
// family, IPv4 first (.status.podIP unchanged by dual stack).
func podIPs(t *testing.T, pods ...string) {
	t.Helper()
	// The whole namespace: kubectl get of one named pod prints a Pod, not a List.
	out, err := suite.c.Kubectl(ctx, "get", "pods", "-n", namespace, "-o",
		`jsonpath={range .items[*]}{.metadata.name}={.metadata.uid}={range .status.podIPs[*]}{.ip},{end}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, l := range strings.Fields(out) {
		f := strings.Split(l, "=")
		if !slices.Contains(pods, f[0]) {
			continue
		}
		found++
		ips := strings.Split(strings.TrimSuffix(f[2], ","), ",")
		if len(ips) != 2 || !isFamily(ips[0], false) || !isFamily(ips[1], true) {
			t.Fatalf("%s has pod IPs %v, want IPv4 then IPv6", f[0], ips)
		}
		suite.ips[f[0]], suite.uids[f[0]], ips6[f[0]] = ips[0], f[1], ips[1]
	}
	if found != len(pods) {
		t.Fatalf("found %d of the pods %v:\n%s", found, pods, out)
	}
}

func isFamily(ip string, six bool) bool {
	a, err := netip.ParseAddr(ip)
	return err == nil && a.Is6() == six
}

// TestDualStack: init-container pods captured in both families, over IPv6 through both
// sidecars.
func TestDualStack(t *testing.T) {
	steps := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"pods-start", dsPodsUp},
		{"ebpf/outbound-ipv6", func(t *testing.T) { outbound6(t, dsEBPF) }},
		{"ebpf/inbound-ipv6", func(t *testing.T) { inbound6(t, dsEBPF, addr6(dsEBPF, appPort)) }},
		{"ebpf/outbound-ipv4", func(t *testing.T) { outbound(t, dsEBPF) }},
		{"ebpf/inbound-ipv4", func(t *testing.T) { inbound(t, dsEBPF, addr(dsEBPF, appPort)) }},
		{"iptables/outbound-ipv6", func(t *testing.T) { outbound6(t, dsIpt) }},
		{"iptables/inbound-ipv6", func(t *testing.T) { inbound6(t, dsIpt, addr6(dsIpt, inboundPrt)) }},
		{"iptables/outbound-ipv4", func(t *testing.T) { outbound(t, dsIpt) }},
		{"iptables/inbound-ipv4", func(t *testing.T) { inbound(t, dsIpt, addr(dsIpt, inboundPrt)) }},
		{"mesh-ipv6/ds-ebpf->ds-ipt", func(t *testing.T) { mesh6(t, dsEBPF, dsIpt) }},
		{"mesh-ipv6/ds-ipt->ds-ebpf", func(t *testing.T) { mesh6(t, dsIpt, dsEBPF) }},
		{"mesh-a/ipv6-not-captured-without-dual-stack", ipv6NotCaptured},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.fn) && s.name == "pods-start" {
			t.Fatal("the dual-stack pods did not start")
		}
	}
}

func dsPodsUp(t *testing.T) {
	r := scenario(t)
	plain := pod(dsPlain, map[string]string{"app": dsPlain}, obj{"containers": []obj{
		container("app", appUID, "server", "--name", dsPlain, "--listen", "[::]:"+appPort)}})
	if _, err := suite.c.KubectlIn(ctx, list(plain, dsInitPod(dsEBPF, ebpf), dsInitPod(dsIpt, iptables)), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	names := []string{dsPlain, dsEBPF, dsIpt}
	if _, err := suite.c.Kubectl(ctx, append([]string{"wait", "-n", namespace, "--for=condition=Ready", "pod", "--timeout=120s"}, names...)...); err != nil {
		t.Fatalf("%v\n%s", err, suite.describe())
	}
	podIPs(t, append(names, meshA)...)
	for p, ctrs := range map[string][]string{dsPlain: {"app"}, dsEBPF: {"proxy", "app"}, dsIpt: {"proxy", "app"}} {
		for _, ctr := range ctrs {
			if err := waitListening(p, ctr); err != nil {
				t.Fatal(err)
			}
		}
	}
	// istio-init says which families it captured and why (cmd/divert/family.go).
	for _, p := range []string{dsEBPF, dsIpt} {
		logs, err := suite.c.Kubectl(ctx, "logs", "-n", namespace, p, "-c", "istio-init")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(logs, "dual stack, the pod has an IPv6 address") {
			t.Fatalf("%s's istio-init does not say it captures IPv6 (dual stack):\n%s", p, tailLines(logs, 20))
		}
	}
	r.note("%s %s/%s, %s %s/%s", dsEBPF, suite.ips[dsEBPF], ips6[dsEBPF], dsIpt, suite.ips[dsIpt], ips6[dsIpt])
}

// outbound6: the app's native IPv6 connect() lands on the proxy's [::]:15001 listener
// (captured to [::1]), which reads the IPv6 original destination (IP6T_SO_ORIGINAL_DST)
// and reaches the server.
func outbound6(t *testing.T, meshed string) {
	r := scenario(t)
	expect(t, r, meshed, "app", addr6(dsPlain, appPort),
		want{who: meshed + "-proxy", listener: "[::]:" + outboundPrt, orig: addr6(dsPlain, appPort)},
		want{who: dsPlain, peerIP: ips6[meshed]})
}

// inbound6: IPv6 from outside to the app's port lands on [::]:15006 with the original
// destination kept; the proxy forwards from ::6 (not captured again). local tells the
// backend as for IPv4 (sk_lookup: the original destination; REDIRECT: [pod IPv6]:15006).
func inbound6(t *testing.T, meshed, local string) {
	r := scenario(t)
	expect(t, r, dsPlain, "app", addr6(meshed, appPort),
		want{who: meshed + "-proxy", listener: "[::]:" + inboundPrt, orig: addr6(meshed, appPort), local: local, peerIP: ips6[dsPlain]},
		want{who: meshed + "-app", peerIP: "::6"})
}

// ipv6NotCaptured: mesh-a has an IPv6 address too but no ISTIO_DUAL_STACK, so istio
// decides it IPv4-only (docs/semantics.md) and so does divert: its app's IPv6 connection
// goes straight to the server, past the proxy.
func ipv6NotCaptured(t *testing.T) {
	r := scenario(t)
	expect(t, r, meshA, "app", addr6(dsPlain, appPort), want{who: dsPlain, peerIP: ips6[meshA]})
}

// mesh6: pod to pod over IPv6 through both sidecars.
func mesh6(t *testing.T, from, to string) {
	r := scenario(t)
	expect(t, r, from, "app", addr6(to, appPort),
		want{who: from + "-proxy", listener: "[::]:" + outboundPrt, orig: addr6(to, appPort)},
		want{who: to + "-proxy", listener: "[::]:" + inboundPrt, orig: addr6(to, appPort), peerIP: ips6[from]},
		want{who: to + "-app", peerIP: "::6"})
}

// nodeDualStack: node mode captures a pod with ISTIO_DUAL_STACK=true in its istio-proxy
// container (as istio-cni reads it) in both families.
func nodeDualStack(t *testing.T) {
	steps := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"pod-starts", nodeDSUp},
		{"outbound-ipv6", func(t *testing.T) { outbound6(t, nodeDS) }},
		{"inbound-ipv6", func(t *testing.T) { inbound6(t, nodeDS, addr6(nodeDS, appPort)) }},
		{"outbound-ipv4", func(t *testing.T) { outbound(t, nodeDS) }},
		{"mesh-ipv6/node-ds->ds-ipt", func(t *testing.T) { mesh6(t, nodeDS, dsIpt) }},
		{"mesh-ipv6/ds-ebpf->node-ds", func(t *testing.T) { mesh6(t, dsEBPF, nodeDS) }},
		// Gone before the agent restart and uninstall rows, which count what it captures.
		{"pod-deleted", func(t *testing.T) {
			if _, err := suite.c.Kubectl(ctx, "delete", "pod", "-n", namespace, nodeDS, "--wait=true", "--timeout=60s"); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.fn) && s.name == "pod-starts" {
			t.Fatal("node-ds did not start")
		}
	}
}

func nodeDSUp(t *testing.T) {
	r := scenario(t)
	if ips6[dsPlain] == "" || ips6[dsEBPF] == "" || ips6[dsIpt] == "" {
		t.Fatal("TestDualStack's pods are not up (run it before TestNodeMode: -run 'TestDualStack|TestNodeMode')")
	}
	p := pod(nodeDS, map[string]string{"app": nodeDS}, obj{"containers": []obj{dsProxy("istio-proxy", nodeDS), dsApp(nodeDS)}})
	p["metadata"].(obj)["annotations"] = map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`}
	if _, err := suite.c.KubectlIn(ctx, list(p), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	podReady(t, nodeDS, "120s")
	podIPs(t, nodeDS)
	for _, ctr := range []string{"istio-proxy", "app"} {
		if err := waitListening(nodeDS, ctr); err != nil {
			t.Fatal(err)
		}
	}
	r.note("%s %s/%s; agent: %s", nodeDS, suite.ips[nodeDS], ips6[nodeDS], pinState(t, nodeDS, true))
}
