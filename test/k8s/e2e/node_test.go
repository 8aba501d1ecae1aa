package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/test/k8s/e2e/cluster"
)

// Node mode: deploy/helm/divert installed with Helm (image and host paths pointed at this
// cluster, helm_test.go), then pods with no divert container at all. The agent installs divert-cni into
// the cluster's CNI bin dir and chains it into the cluster's conflist; containerd runs the
// plugin for every new pod and the agent captures the meshed ones.
const (
	agentNS     = "divert-system"
	agentLabel  = "app=divert-node"
	nodeMesh    = "node-mesh"
	nodeUnmesh  = "node-plain"
	nodeLate    = "node-late"
	nodeDNS     = "node-dns"
	nodeDup     = "node-dup"
	metricsPort = "15099"
)

// TestNodeMode runs its rows in order: each builds on the one before (the agent must be
// up before the pods, the pods before the restart, the restart before the delete).
func TestNodeMode(t *testing.T) {
	steps := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"migration/istio-init-pod-runs", migrationPodUp},
		{"agent-installs-plugin", nodeAgentUp},
		{"migration/to-node-mode-no-escape", migrationToNode},
		{"pods-start", nodePodsUp},
		{"meshed/pinned", nodePinned},
		{"meshed/outbound", func(t *testing.T) { outbound(t, nodeMesh) }},
		{"meshed/inbound", func(t *testing.T) { inbound(t, nodeMesh, addr(nodeMesh, appPort)) }},
		{"meshed/annotation-excludes-cidr", nodeAnnotationHonoured},
		{"tproxy/app-sees-client", nodeTProxy},
		{"exclude-interfaces/refused", nodeExcludeInterfacesRefused},
		{"services", nodeServices},
		{"dns/captured", func(t *testing.T) { dnsRows(t, dnsCase{nodeDNS, "istio-proxy", true, true}) }},
		{"dns/not-captured", func(t *testing.T) { dnsRows(t, dnsCase{nodeMesh, "proxy", false, true}) }},
		{"native-sidecar/non-1337-uid", nodeNativeSidecar},
		{"dual-stack", nodeDualStack},
		{"unmeshed/untouched", nodeUnmeshedUntouched},
		{"metrics", nodeMetrics},
		{"agent-restart-no-escape", nodeAgentRestart},
		{"second-pod-id/refused-by-agent", nodeSecondPodIDRefused},
		{"helm-upgrade-new-tag-no-escape", nodeHelmUpgrade},
		{"pod-deleted-pins-gone", nodePodDeleted},
		{"agent-down-pod-fails-closed", nodeAgentDownFailsClosed},
		{"agent-back-pod-starts-captured", nodeAgentBack},
		{"helm-uninstall-leaves-what-docs-say", nodeHelmUninstall},
		{"migration/back-to-iptables-no-escape", migrationBack},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.fn) {
			t.Fatalf("%s failed; the rows after it depend on it", s.name)
		}
	}
}

// nodeAgentUp installs the chart (helm_test.go) with this cluster's directories and waits
// for the agent to say it is ready; the plugin must then be in the bin dir and chained.
func nodeAgentUp(t *testing.T) {
	r := scenario(t)
	helmInstall(t)
	start := time.Now()
	agent := waitAgentReady(t, "")
	bin, err := os.Lstat(filepath.Join(suite.c.CNIBinDir, "divert-cni"))
	if err != nil || !bin.Mode().IsRegular() {
		t.Fatalf("divert-cni not installed in the cluster's CNI bin dir: %v", err)
	}
	conf, err := os.ReadFile(filepath.Join(suite.c.CNIConfDir, cluster.CNIConflist))
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(conf, &list); err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Type)
	}
	if len(types) == 0 || types[len(types)-1] != "divert-cni" {
		t.Fatalf("divert-cni is not chained last in %s: %v", cluster.CNIConflist, types)
	}
	r.note("%s ready in %s; conflist %s", agent, time.Since(start).Round(time.Second), strings.Join(types, " -> "))
}

// hostCgroup2 is where the host mounts cgroup2 (/sys/fs/cgroup, or /sys/fs/cgroup/unified
// on a hybrid layout), as the manifest's /host/sys/fs/cgroup volume shows it to the agent.
func hostCgroup2() (string, error) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 2 && f[2] == "cgroup2" && strings.HasPrefix(f[1], "/sys/fs/cgroup") {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("no cgroup2 mount under /sys/fs/cgroup")
}

// waitAgentReady waits for an agent pod other than old to log its ready line and returns
// its name.
func waitAgentReady(t *testing.T, old string) string {
	t.Helper()
	var name string
	err := suite.c.WaitFor(ctx, "divert node agent ready", 120*time.Second, func() error {
		out, err := suite.c.Kubectl(ctx, "get", "pods", "-n", agentNS, "-l", agentLabel, "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{"\n"}{end}`)
		if err != nil {
			return err
		}
		name = ""
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if f := strings.Fields(l); len(f) == 1 && f[0] != old {
				name = f[0]
			}
		}
		if name == "" {
			return fmt.Errorf("no new agent pod yet: %q", out)
		}
		logs, err := suite.c.Kubectl(ctx, "logs", "-n", agentNS, name)
		if err != nil {
			return err
		}
		if !strings.Contains(logs, "msg=ready") {
			return fmt.Errorf("agent %s not ready: %s", name, tailLines(logs, 5))
		}
		return nil
	})
	if err != nil {
		desc, _ := suite.c.Kubectl(ctx, "describe", "pods", "-n", agentNS)
		t.Fatalf("%v\n%s", err, tailLines(desc, 40))
	}
	return name
}

// nodePod is a sidecar-shaped pod with no divert container: node mode must capture it
// because of its annotations alone (meshed), or leave it alone (unmeshed).
func nodePod(name string, meshed bool, annotations map[string]string) obj {
	ctrs := []obj{container("app", appUID, "server", "--name", name+"-app", "--listen", "0.0.0.0:"+appPort)}
	if meshed {
		ctrs = append([]obj{container("proxy", proxyUID, "proxy", "--name", name+"-proxy", "--mode", "forward",
			"--inbound-src", "127.0.0.6", "--listen", "0.0.0.0:"+outboundPrt, "--listen", "0.0.0.0:"+inboundPrt)}, ctrs...)
		annotations["sidecar.istio.io/status"] = `{"containers":["proxy"]}` // what Istio's injector leaves
	}
	p := pod(name, map[string]string{"app": name}, obj{"containers": ctrs})
	p["metadata"].(obj)["annotations"] = annotations
	return p
}

func nodePodsUp(t *testing.T) {
	r := scenario(t)
	pods := list(
		// Istio's per-pod annotation: mesh-ipt's address bypasses this pod's proxy.
		nodePod(nodeMesh, true, map[string]string{
			"traffic.sidecar.istio.io/excludeOutboundIPRanges": suite.ips[meshIpt] + "/32",
		}),
		nodePod(nodeUnmesh, false, map[string]string{}),
		nodeDNSPod(nodeDNS),
		nodeDupPod(nodeDup, suite.c.BPFFS),
	)
	if _, err := suite.c.KubectlIn(ctx, pods, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	names := []string{nodeMesh, nodeUnmesh, nodeDNS, nodeDup}
	if _, err := suite.c.Kubectl(ctx, append([]string{"wait", "-n", namespace, "--for=condition=Ready", "pod", "--timeout=120s"}, names...)...); err != nil {
		t.Fatalf("%v\n%s", err, suite.describe())
	}
	out, err := suite.c.Kubectl(ctx, append([]string{"get", "pods", "-n", namespace, "-o", `jsonpath={range .items[*]}{.metadata.name}={.status.podIP}={.metadata.uid}{"\n"}{end}`}, names...)...)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Fields(out) {
		f := strings.Split(l, "=")
		suite.ips[f[0]], suite.uids[f[0]] = f[1], f[2]
	}
	for p, ctrs := range map[string][]string{nodeMesh: {"proxy", "app"}, nodeUnmesh: {"app"}, nodeDNS: {"istio-proxy", "app"}, nodeDup: {"proxy", "app"}} {
		for _, ctr := range ctrs {
			if err := waitListening(p, ctr); err != nil {
				t.Fatal(err)
			}
		}
	}
	// node-dup runs, captured by its own istio-init; now it asks for the agent's capture
	// too, which the agent must refuse (nodeSecondPodIDRefused, after the agent restart).
	if _, err := suite.c.Kubectl(ctx, "label", "pod", "-n", namespace, nodeDup, "divert.meshdivert.io/capture=true"); err != nil {
		t.Fatal(err)
	}
	r.note("%s %s, %s %s", nodeMesh, suite.ips[nodeMesh], nodeUnmesh, suite.ips[nodeUnmesh])
}

// nodePinned: the agent pinned the meshed pod's programs under its UID in the cluster's
// bpffs; its log says so.
func nodePinned(t *testing.T) {
	r := scenario(t)
	r.note("agent: %s", pinState(t, nodeMesh, true))
}

// pinState checks that the pod has pins (or none) and returns what the agent logged
// about it.
func pinState(t *testing.T, pod string, want bool) string {
	t.Helper()
	_, err := os.Stat(filepath.Join(suite.c.BPFFS, "divert", suite.uids[pod]))
	if want && err != nil {
		t.Fatalf("no pins for %s (uid %s): %v", pod, suite.uids[pod], err)
	}
	if !want && err == nil {
		t.Fatalf("pins exist for %s (uid %s), which must not be captured", pod, suite.uids[pod])
	}
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", agentNS, "-l", agentLabel, "--tail=-1")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "pod="+namespace+"/"+pod+" ") {
			return strings.TrimSpace(l[strings.Index(l, "msg="):])
		}
	}
	t.Fatalf("the agent's log says nothing about %s:\n%s", pod, tailLines(logs, 20))
	return ""
}

// nodeAnnotationHonoured: the pod's excludeOutboundIPRanges annotation makes its dial to
// mesh-ipt skip its own proxy; it enters mesh-ipt through mesh-ipt's inbound capture.
func nodeAnnotationHonoured(t *testing.T) {
	r := scenario(t)
	expect(t, r, nodeMesh, "app", addr(meshIpt, appPort),
		want{who: meshIpt + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(meshIpt, appPort), local: addr(meshIpt, inboundPrt)},
		want{who: meshIpt + "-app", peerIP: "127.0.0.6"})
}

// nodeTProxy: sidecar.istio.io/interceptionMode: TPROXY, with the proxy as Istio's
// injector runs it in that mode (istio-proxy as uid 0, group 1337, NET_ADMIN) and forwarding
// inbound connections from the client's address as Envoy's original_src does (mark 1337):
// the app must see the client pod's address, the point of TPROXY mode (docs/semantics.md).
func nodeTProxy(t *testing.T) {
	r := scenario(t)
	const name = "node-tproxy"
	proxy := container("istio-proxy", 0, "proxy", "--name", name+"-proxy", "--mode", "forward", "--transparent",
		"--original-src-mark", "1337", "--listen", "0.0.0.0:"+outboundPrt, "--listen", "0.0.0.0:"+inboundPrt)
	proxy["securityContext"] = obj{"runAsUser": 0, "runAsGroup": proxyUID, "allowPrivilegeEscalation": false,
		"capabilities": obj{"add": []string{"NET_ADMIN"}}}
	p := pod(name, map[string]string{"app": name}, obj{"containers": []obj{proxy,
		container("app", appUID, "server", "--name", name+"-app", "--listen", "0.0.0.0:"+appPort)}})
	p["metadata"].(obj)["annotations"] = obj{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`,
		"sidecar.istio.io/interceptionMode": "TPROXY"}
	applyPod(t, p, name)
	podReady(t, name, "120s")
	podListening(t, name, "istio-proxy", "app")
	expect(t, r, plainName, "app", addr(name, appPort),
		want{who: name + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(name, appPort), local: addr(name, appPort)},
		want{who: name + "-app", peerIP: suite.ips[plainName]})
}

// nodeExcludeInterfacesRefused: traffic.sidecar.istio.io/excludeInterfaces cannot be done
// in eBPF (a connect or sk_lookup hook does not know the interface a connection will take
// or came in on before routing) and node mode has no iptables to fall back to, so the agent
// refuses the pod's sandbox in one line naming the annotation, and the pod stays Pending
// rather than starting with traffic on the excluded interface captured.
func nodeExcludeInterfacesRefused(t *testing.T) {
	r := scenario(t)
	const name = "node-excl-if"
	p := nodePod(name, true, map[string]string{"traffic.sidecar.istio.io/excludeInterfaces": "net1"})
	applyPod(t, p, name)
	rest := sandboxRefused(t, name, "traffic.sidecar.istio.io/excludeInterfaces")
	r.note("Pending, event: divert: %s", rest)
}

// nodeNativeSidecar: Istio's native sidecar (istio-proxy as an init container with
// restartPolicy: Always, Istio's default on Kubernetes 1.29+) running as a uid other than
// 1337, as OpenShift assigns: the agent must take the proxy's uid from the init container,
// or the proxy's own upstream dial is captured back to itself and never reaches the server.
func nodeNativeSidecar(t *testing.T) {
	r := scenario(t)
	const name, uid = "node-native", 2000
	p := pod(name, map[string]string{"app": name}, obj{
		"initContainers": []obj{nativeSidecar(name, uid), appInit(vip(plainName))},
		"containers":     []obj{container("app", appUID, "server", "--name", name+"-app", "--listen", "0.0.0.0:"+appPort)},
	})
	p["metadata"].(obj)["annotations"] = obj{"sidecar.istio.io/status": `{"initContainers":["istio-proxy"]}`}
	applyPod(t, p, name)
	podReady(t, name, "120s")
	podListening(t, name, "istio-proxy", "app")
	logged := pinState(t, name, true)
	initPath := appInitThroughSidecar(t, name)
	expect(t, r, name, "app", addr(plainName, appPort),
		want{who: name + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
		want{who: plainName})
	r.note("proxy uid %d from the native sidecar; app-init: %s; agent: %s", uid, initPath, logged)
}

// nodeUnmeshedUntouched: a pod without a sidecar annotation started through the same
// chained plugin: no pins, its dial goes straight out and a dial to it straight in.
func nodeUnmeshedUntouched(t *testing.T) {
	r := scenario(t)
	logged := pinState(t, nodeUnmesh, false)
	expect(t, r, nodeUnmesh, "app", addr(plainName, appPort), want{who: plainName})
	expect(t, r, plainName, "app", addr(nodeUnmesh, appPort), want{who: nodeUnmesh + "-app", peerIP: suite.ips[plainName]})
	r.note("no pins, out: straight to %s, in: straight to %s; agent: %s", plainName, nodeUnmesh+"-app", logged)
}

// nodeMetrics: the agent's Prometheus endpoint (host network) exports every captured pod
// of the node under its name, whoever attached it, and counts exactly the connections the
// row makes: node-mesh (attached by the agent), mesh-a (divert as istio-init with divert's
// template: named by the pod_name it pinned) and mesh-b (divert as the init container's
// command, given no name: named by the agent from the API). Each app dials plain three
// times; each dial is one captured connect (included-cidr) and one of the proxy's
// (proxy-uid), and nothing is dropped. The iptables fallback pod is exported by name too.
func nodeMetrics(t *testing.T) {
	r := scenario(t)
	const conns = 3
	pods := []string{nodeMesh, meshA, meshB}
	before := scrapeMetrics(t)
	for _, p := range pods {
		for range conns {
			expect(t, r, p, "app", addr(plainName, appPort),
				want{who: p + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
				want{who: plainName})
		}
	}
	after := scrapeMetrics(t)
	for _, p := range pods {
		labels := podLabels(p)
		for _, reason := range []string{"included-cidr", "proxy-uid"} {
			series := `divert_verdicts_total{` + labels + `,reason="` + reason + `"}`
			if _, ok := after[series]; !ok {
				t.Fatalf("metrics lack %s", series)
			}
			if d := after[series] - before[series]; d != conns {
				t.Errorf("%s moved by %v over %d connections, want %d", series, d, conns, conns)
			}
		}
		for series, v := range after {
			if strings.HasPrefix(series, "divert_drops_total{"+labels+",") && v != 0 {
				t.Errorf("%s = %v, want 0", series, v)
			}
		}
	}
	r.note("%s, %s, %s: each +%d included-cidr, +%d proxy-uid, no drops; %s named", nodeMesh, meshA, meshB, conns, conns, meshAuto)
	fb := `divert_iptables_fallback{` + podLabels(meshAuto) + `,reason=`
	if !slices.ContainsFunc(slices.Collect(maps.Keys(after)), func(s string) bool { return strings.HasPrefix(s, fb) }) {
		t.Errorf("metrics lack %s...}", fb)
	}
	for _, op := range []string{"attach", "update", "detach", "reconcile"} {
		if _, ok := after[`divert_agent_errors_total{operation="`+op+`"}`]; !ok {
			t.Errorf("metrics lack divert_agent_errors_total{operation=%q}", op)
		}
	}
}

func podLabels(pod string) string {
	return fmt.Sprintf(`pod_uid=%q,namespace=%q,pod=%q`, suite.uids[pod], namespace, pod)
}

// scrapeMetrics reads the agent's /metrics: series (name{labels}) to value.
func scrapeMetrics(t *testing.T) map[string]float64 {
	t.Helper()
	cl := &http.Client{Timeout: 5 * time.Second}
	resp, err := cl.Get("http://" + suite.c.NodeIP + ":" + metricsPort + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if i < 0 || err != nil {
			t.Fatalf("metrics line %q: not a series and a value", l)
		}
		out[l[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// nodeAgentRestart: the meshed app dials out again and again while the agent pod is
// deleted and the DaemonSet starts a new one. Every connection must go through the proxy
// (pins keep the programs attached while no agent runs; the new agent's refresh swaps
// programs with link.Update), and the links must be the same ones.
func nodeAgentRestart(t *testing.T) {
	r := scenario(t)
	old, err := suite.c.Kubectl(ctx, "get", "pods", "-n", agentNS, "-l", agentLabel, "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil {
		t.Fatal(err)
	}
	before := podLinks(t, old, suite.uids[nodeMesh])

	type clientOut struct {
		out string
		err error
	}
	done := make(chan clientOut, 1)
	const traffic = 15 * time.Second
	go func() {
		out, err := suite.c.Kubectl(ctx, "exec", "-n", namespace, nodeMesh, "-c", "app", "--",
			"/testapp", "client", "--timeout", "3s", "--for", traffic.String(), "--interval", "20ms",
			"--target", addr(plainName, appPort))
		done <- clientOut{out, err}
	}()
	time.Sleep(time.Second)
	start := time.Now()
	if _, err := suite.c.Kubectl(ctx, "delete", "pod", "-n", agentNS, old, "--timeout=60s"); err != nil {
		t.Fatal(err)
	}
	gone := time.Since(start)
	agent := waitAgentReady(t, old)
	restart := time.Since(start)
	select {
	case <-done:
		t.Fatalf("the client finished before the new agent was ready (%s): lengthen its --for", restart)
	default:
	}
	c := <-done
	if c.err != nil {
		t.Fatal(c.err)
	}
	n := 0
	for _, l := range strings.Split(strings.TrimSpace(c.out), "\n") {
		var res result
		if err := json.Unmarshal([]byte(l), &res); err != nil {
			t.Fatalf("client line %q: %v", l, err)
		}
		n++
		if err := check(res,
			want{who: nodeMesh + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
			want{who: plainName}); err != nil {
			t.Fatalf("connection %d of the restart: %v", n, err)
		}
	}
	after := podLinks(t, agent, suite.uids[nodeMesh])
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("links changed over the agent restart (capture had a gap): %v -> %v", before, after)
	}
	r.note("%d connections in %s, all via the proxy; old agent gone after %s, new one ready after %s; %d links unchanged",
		n, traffic, gone.Round(100*time.Millisecond), restart.Round(100*time.Millisecond), len(after))
}

// podLinks is the pod's program -> link ID, as `divert status` in the agent pod reports.
func podLinks(t *testing.T, agent, uid string) map[string]uint32 {
	t.Helper()
	out, err := suite.c.Kubectl(ctx, "exec", "-n", agentNS, agent, "--", "divert", "status", "--pod-id", uid, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st []struct {
		Programs []struct {
			Name   string `json:"name"`
			LinkID uint32 `json:"linkId"`
		} `json:"programs"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st) != 1 {
		t.Fatalf("divert status: %v\n%s", err, out)
	}
	links := map[string]uint32{}
	for _, p := range st[0].Programs {
		links[p.Name] = p.LinkID
	}
	return links
}

// nodePodDeleted: the runtime's CNI DEL reaches the agent through the plugin, which
// removes the pod's pins (well before the periodic reconcile would).
func nodePodDeleted(t *testing.T) {
	r := scenario(t)
	if len(podCgroups(t, suite.uids[nodeMesh])) == 0 {
		t.Fatalf("cannot find %s's cgroup v2 directory while it runs: podCgroups is wrong", nodeMesh)
	}
	start := time.Now()
	if _, err := suite.c.Kubectl(ctx, "delete", "pod", "-n", namespace, nodeMesh, "--timeout=60s"); err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join(suite.c.BPFFS, "divert", suite.uids[nodeMesh])
	if err := suite.c.WaitFor(ctx, "pins of "+nodeMesh+" removed", 20*time.Second, func() error {
		if _, err := os.Stat(pins); err == nil {
			return fmt.Errorf("%s still exists", pins)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	pinsGone := time.Since(start)
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", agentNS, "-l", agentLabel, "--tail=-1")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs, "msg=released pod="+namespace+"/"+nodeMesh) {
		t.Fatalf("the agent did not log releasing %s:\n%s", nodeMesh, tailLines(logs, 10))
	}
	// The agent may have made the pod's cgroup v2 directory at CNI ADD (before runc did):
	// it must not outlive the pod.
	if err := suite.c.WaitFor(ctx, nodeMesh+"'s cgroup removed", 60*time.Second, func() error {
		if left := podCgroups(t, suite.uids[nodeMesh]); len(left) > 0 {
			return fmt.Errorf("still there: %v", left)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	r.note("pins gone %s after kubectl delete started (agent logged the release); pod cgroup gone after %s",
		pinsGone.Round(100*time.Millisecond), time.Since(start).Round(100*time.Millisecond))
}

// nodeAgentDownFailsClosed: the agent is gone but its DaemonSet stays (as in an upgrade,
// or a node the DaemonSet no longer matches): divert-cni stays chained, and a meshed pod
// must not start uncaptured: the runtime reports the plugin's error and the kubelet
// keeps retrying.
func nodeAgentDownFailsClosed(t *testing.T) {
	r := scenario(t)
	if _, err := suite.c.Kubectl(ctx, "patch", "daemonset", "-n", agentNS, "divert-node", "--type=merge",
		"-p", `{"spec":{"template":{"spec":{"nodeSelector":{"divert.test/agent":"off"}}}}}`); err != nil {
		t.Fatal(err)
	}
	waitNoAgent(t)
	if !chained(t) {
		t.Fatalf("the agent took divert-cni out of the conflist on a restart (its DaemonSet stays)")
	}
	if _, err := suite.c.KubectlIn(ctx, list(nodePod(nodeLate, true, map[string]string{})), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	rest := sandboxRefused(t, nodeLate, "not captured")
	r.note("still chained; Pending, event: divert: %s", rest)
}

// sandboxRefused waits until the runtime reports divert-cni's refusal of name's sandbox
// (a FailedCreatePodSandBox event containing want), checks that the pod stays Pending,
// and returns the event's text after "divert: ".
func sandboxRefused(t *testing.T, name, want string) string {
	t.Helper()
	var msg string
	if err := suite.c.WaitFor(ctx, name+"'s sandbox refused by divert-cni", 60*time.Second, func() error {
		out, err := suite.c.Kubectl(ctx, "get", "events", "-n", namespace, "--field-selector", "involvedObject.name="+name,
			"-o", `jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}`)
		if err != nil {
			return err
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "FailedCreatePodSandBox") && strings.Contains(l, want) {
				msg = l
				return nil
			}
		}
		return fmt.Errorf("no FailedCreatePodSandBox event with %q yet: %s", want, tailLines(out, 3))
	}); err != nil {
		t.Fatal(err)
	}
	phase, err := suite.c.Kubectl(ctx, "get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.phase}")
	if err != nil || phase != "Pending" {
		t.Fatalf("%s: phase %q (%v), want Pending: divert-cni refused its sandbox", name, phase, err)
	}
	_, rest, _ := strings.Cut(msg, "divert: ")
	return rest
}

// waitNoAgent waits until no agent pod exists.
func waitNoAgent(t *testing.T) {
	t.Helper()
	if err := suite.c.WaitFor(ctx, "agent pods gone", 60*time.Second, func() error {
		out, err := suite.c.Kubectl(ctx, "get", "pods", "-n", agentNS, "-l", agentLabel, "-o", "name")
		if err == nil && strings.TrimSpace(out) != "" {
			err = fmt.Errorf("still there: %s", out)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// chained reports whether divert-cni is in the cluster's conflist.
func chained(t *testing.T) bool {
	t.Helper()
	conf, err := os.ReadFile(filepath.Join(suite.c.CNIConfDir, cluster.CNIConflist))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(conf), `"divert-cni"`)
}

// nodeAgentBack: the DaemonSet matches the node again; the kubelet's next sandbox attempt
// goes through the new agent and the pod starts captured.
func nodeAgentBack(t *testing.T) {
	r := scenario(t)
	if _, err := suite.c.Kubectl(ctx, "patch", "daemonset", "-n", agentNS, "divert-node", "--type=json",
		"-p", `[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]`); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	waitAgentReady(t, "")
	podReady(t, nodeLate, "180s")
	started := time.Since(start)
	podListening(t, nodeLate, "proxy", "app")
	pinState(t, nodeLate, true)
	expect(t, r, nodeLate, "app", addr(plainName, appPort),
		want{who: nodeLate + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
		want{who: plainName})
	r.note("Ready %s after the agent came back; %s", started.Round(time.Second), r.detail)
}

// podCgroups lists the pod's cgroup v2 directories on the host (cgroupfs or systemd
// driver names, any QoS class).
func podCgroups(t *testing.T, uid string) []string {
	t.Helper()
	root, err := hostCgroup2()
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, pattern := range []string{"kubepods*/pod" + uid, "kubepods*/*/pod" + uid, "kubepods*/*pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"} {
		m, _ := filepath.Glob(filepath.Join(root, pattern))
		found = append(found, m...)
	}
	return found
}

// applyPod creates the pod p (named name) and deletes it, without waiting, when the test
// ends.
func applyPod(t *testing.T, p obj, name string) {
	t.Helper()
	if _, err := suite.c.KubectlIn(ctx, list(p), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		suite.c.Kubectl(ctx, "delete", "pod", "-n", namespace, name, "--wait=false")
	})
}

// podReady waits for the pod to be Ready (timeout: kubectl's, e.g. "120s").
func podReady(t *testing.T, name, timeout string) {
	t.Helper()
	if _, err := suite.c.Kubectl(ctx, "wait", "-n", namespace, "--for=condition=Ready", "pod", name, "--timeout="+timeout); err != nil {
		t.Fatalf("%v\n%s", err, suite.describe())
	}
}

// podListening records the Ready pod's IP and UID (suite.ips, suite.uids) and waits until
// each of its containers ctrs listens.
func podListening(t *testing.T, name string, ctrs ...string) {
	t.Helper()
	out, err := suite.c.Kubectl(ctx, "get", "pod", "-n", namespace, name, "-o", `jsonpath={.status.podIP}={.metadata.uid}`)
	if err != nil {
		t.Fatal(err)
	}
	suite.ips[name], suite.uids[name], _ = strings.Cut(strings.TrimSpace(out), "=")
	for _, ctr := range ctrs {
		if err := waitListening(name, ctr); err != nil {
			t.Fatal(err)
		}
	}
}

// waitListening waits for the ready line testpod's helpers print once they listen.
func waitListening(pod, ctr string) error {
	return suite.c.WaitFor(ctx, pod+"/"+ctr+" listening", 30*time.Second, func() error {
		logs, err := suite.c.Kubectl(ctx, "logs", "-n", namespace, pod, "-c", ctr)
		if err != nil {
			return err
		}
		if !strings.Contains(logs, "ready") {
			return fmt.Errorf("no ready line yet")
		}
		return nil
	})
}
