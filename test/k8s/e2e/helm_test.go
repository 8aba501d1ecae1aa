package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/test/k8s/e2e/cluster"
)

// Node mode is installed, upgraded and uninstalled with Helm from deploy/helm/divert, as
// docs/install.md tells users; only the values below are this cluster's.
const (
	release       = "divert"
	chartPath     = "../../../deploy/helm/divert"
	divertNextRef = "divert.test/divert:e2e-next" // the upgrade's new tag
)

// nodeValues points the chart at this cluster: the test image (never pulled), and the
// cluster's CNI dirs, bpffs and netns dir under its state directory.
func nodeValues(c *cluster.Cluster) (string, error) {
	repo, tag, _ := strings.Cut(divertRef, ":")
	v := obj{
		"image":     obj{"repository": repo, "tag": tag, "pullPolicy": "Never"},
		"cni":       obj{"binDir": c.CNIBinDir, "confDir": c.CNIConfDir},
		"bpffs":     c.BPFFS,
		"netnsDir":  c.NetNSDir,
		"socketDir": filepath.Join(c.State, "divert-run"),
	}
	b, err := json.Marshal(v) // JSON is YAML
	if err != nil {
		return "", err
	}
	p := filepath.Join(c.State, "divert-values.yaml")
	return p, os.WriteFile(p, b, 0o644)
}

// conflistBefore is the cluster's conflist as it was before divert was installed: an
// uninstall must give it back.
var conflistBefore []byte

// helmInstall: helm install --create-namespace, as docs/install.md says.
func helmInstall(t *testing.T) {
	t.Helper()
	var err error
	if conflistBefore, err = os.ReadFile(filepath.Join(suite.c.CNIConfDir, cluster.CNIConflist)); err != nil {
		t.Fatal(err)
	}
	values, err := nodeValues(suite.c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := helm("install", release, chartPath, "--namespace", agentNS, "--create-namespace", "-f", values); err != nil {
		t.Fatal(err)
	}
}

// nodeHelmUpgrade: helm upgrade to a new image tag while the meshed app dials out every
// 20 ms for 20 s. The DaemonSet replaces its agent (the old one leaves divert-cni chained: its
// DaemonSet stays); every connection must go through the proxy, the pod's links must be
// the ones it had, and the new agent must run the new tag.
func nodeHelmUpgrade(t *testing.T) {
	r := scenario(t)
	if err := tagImage(divertRef, divertNextRef); err != nil {
		t.Fatal(err)
	}
	old, err := suite.c.Kubectl(ctx, "get", "pods", "-n", agentNS, "-l", agentLabel, "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil {
		t.Fatal(err)
	}
	before := podLinks(t, old, suite.uids[nodeMesh])
	const traffic = 20 * time.Second // the new agent was ready 2.4-9.7 s after helm upgrade here (load 5-20)
	done := dialFor(nodeMesh, plainName, traffic)
	time.Sleep(time.Second)
	start := time.Now()
	_, tag, _ := strings.Cut(divertNextRef, ":")
	if _, err := helm("upgrade", release, chartPath, "--namespace", agentNS, "--reuse-values", "--set", "image.tag="+tag); err != nil {
		t.Fatal(err)
	}
	agent := waitAgentReady(t, old)
	ready := time.Since(start)
	image, err := suite.c.Kubectl(ctx, "get", "pod", "-n", agentNS, agent, "-o", "jsonpath={.spec.containers[0].image}")
	if err != nil || image != divertNextRef {
		t.Fatalf("the new agent runs %q (%v), want %s", image, err, divertNextRef)
	}
	if !chained(t) {
		t.Fatalf("divert-cni left the conflist over an upgrade")
	}
	c := <-done
	if c.err != nil {
		t.Fatal(c.err)
	}
	if c.end.Before(start.Add(ready)) {
		t.Fatalf("the client stopped before the new agent was ready (%s): lengthen its --for", ready)
	}
	n, err := allCaptured(c.out, nodeMesh, plainName)
	if err != nil {
		t.Fatal(err)
	}
	after := podLinks(t, agent, suite.uids[nodeMesh])
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("links changed over the upgrade (capture had a gap): %v -> %v", before, after)
	}
	hist, err := helm("history", release, "--namespace", agentNS, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var revs []struct {
		Revision int    `json:"revision"`
		Status   string `json:"status"`
	}
	if err := json.Unmarshal([]byte(hist), &revs); err != nil || len(revs) != 2 || revs[1].Status != "deployed" {
		t.Fatalf("helm history: %v\n%s", err, hist)
	}
	r.note("%s -> %s: new agent ready after %s; %d connections in %s, all via the proxy; %d links unchanged; revision %d",
		divertRef, divertNextRef, ready.Round(100*time.Millisecond), n, traffic, len(after), revs[1].Revision)
}

type clientOut struct {
	out string
	err error
	end time.Time
}

// dialFor runs the test app's client in pod's app container against target's app port,
// one connection every 20 ms for d.
func dialFor(pod, target string, d time.Duration) <-chan clientOut {
	done := make(chan clientOut, 1)
	go func() {
		out, err := suite.c.Kubectl(ctx, "exec", "-n", namespace, pod, "-c", "app", "--",
			"/testapp", "client", "--timeout", "3s", "--for", d.String(), "--interval", "20ms",
			"--target", addr(target, appPort))
		done <- clientOut{out, err, time.Now()}
	}()
	return done
}

// allCaptured checks every connection the client reported went app -> pod's proxy
// (original destination read) -> target, and counts them.
func allCaptured(out, pod, target string) (int, error) {
	n := 0
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var res result
		if err := json.Unmarshal([]byte(l), &res); err != nil {
			return n, fmt.Errorf("client line %q: %v", l, err)
		}
		n++
		if err := check(res,
			want{who: pod + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(target, appPort)},
			want{who: target}); err != nil {
			return n, fmt.Errorf("connection %d: %v", n, err)
		}
	}
	return n, nil
}

// nodeHelmUninstall: helm uninstall removes divert from the node, leaving exactly what
// docs/install.md says: the conflist as it was before the install (divert-cni unchained by
// the last agent, which saw its DaemonSet deleted), the divert-cni binary (pods set up
// through it need it for their CNI DEL), the pins of pods it captured (they stay captured),
// the agent's empty socket directory, and the namespace helm created; no object of the
// release.
func nodeHelmUninstall(t *testing.T) {
	r := scenario(t)
	// The last agent's log, read as it is written: its pod is gone when the checks run.
	agent, err := suite.c.Kubectl(ctx, "get", "pods", "-n", agentNS, "-l", agentLabel, "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil {
		t.Fatal(err)
	}
	agentLog := make(chan string, 1)
	go func() {
		out, _ := suite.c.Kubectl(ctx, "logs", "-f", "-n", agentNS, agent, "--since=1s")
		agentLog <- out
	}()
	time.Sleep(500 * time.Millisecond)
	out, err := helm("uninstall", release, "--namespace", agentNS)
	if err != nil {
		t.Fatal(err)
	}
	waitNoAgent(t)
	var lastWords string
	select {
	case lastWords = <-agentLog:
	case <-time.After(10 * time.Second):
		lastWords = "(kubectl logs -f did not end)"
	}
	t.Logf("the last agent's log from its uninstall:\n%s", lastWords)
	conf, err := os.ReadFile(filepath.Join(suite.c.CNIConfDir, cluster.CNIConflist))
	if err != nil {
		t.Fatal(err)
	}
	if chained(t) {
		t.Fatalf("divert-cni still chained after helm uninstall:\n%s", conf)
	}
	if !sameJSON(conf, conflistBefore) {
		t.Fatalf("the conflist is not what it was before the install:\nbefore %s\nafter  %s", conflistBefore, conf)
	}
	if _, err := os.Stat(filepath.Join(suite.c.CNIBinDir, "divert-cni")); err != nil {
		t.Fatalf("the plugin binary must stay for the CNI DEL of pods set up through it: %v", err)
	}
	left, err := suite.c.Kubectl(ctx, "get", "all,configmaps,serviceaccounts,roles,rolebindings", "-n", agentNS,
		"-l", "app.kubernetes.io/instance="+release, "-o", "name")
	if err != nil || strings.TrimSpace(left) != "" {
		t.Fatalf("objects of the release left in %s: %q (%v)", agentNS, left, err)
	}
	cluster, err := suite.c.Kubectl(ctx, "get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/instance="+release, "-o", "name")
	if err != nil || strings.TrimSpace(cluster) != "" {
		t.Fatalf("cluster objects of the release left: %q (%v)", cluster, err)
	}
	sockets, err := os.ReadDir(filepath.Join(suite.c.State, "divert-run"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range sockets {
		names = append(names, e.Name())
	}
	if len(names) != 0 {
		t.Fatalf("socket dir holds %v, want it empty (the agent's listener removes cni.sock when it closes)", names)
	}
	if _, err := os.Stat(filepath.Join(suite.c.BPFFS, "divert", suite.uids[nodeLate])); err != nil {
		t.Fatalf("%s's pins went with the agent: %v", nodeLate, err)
	}
	expect(t, r, nodeLate, "app", addr(plainName, appPort),
		want{who: nodeLate + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
		want{who: plainName})
	captured := r.detail

	// A captured pod deleted after the uninstall: its sandbox goes (the plugin's DEL never
	// fails without an agent), the kernel detaches its programs, its pins stay until
	// divert gc, which the docs tell users to run.
	if _, err := suite.c.Kubectl(ctx, "delete", "pod", "-n", namespace, nodeLate, "--timeout=60s"); err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join(suite.c.BPFFS, "divert", suite.uids[nodeLate])
	if _, err := os.Stat(pins); err != nil {
		t.Fatalf("%s's pins: %v (nothing should have removed them without an agent)", nodeLate, err)
	}
	divert := filepath.Join(*flagCache, "repo-bin", "divert")
	var gc string
	if err := suite.c.WaitFor(ctx, "divert gc removes "+nodeLate+"'s pins", 60*time.Second, func() error {
		b, err := exec.CommandContext(ctx, divert, "gc", "--bpffs", suite.c.BPFFS).CombinedOutput()
		gc = strings.TrimSpace(string(b))
		if err != nil {
			return fmt.Errorf("divert gc: %v: %s", err, b)
		}
		if _, err := os.Stat(pins); err == nil {
			return fmt.Errorf("pins still there after divert gc: %s", b)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("helm: %s; %s while divert was gone: %s; divert gc after its deletion: %s", strings.TrimSpace(out), nodeLate, captured, gc)
	r.note("conflist restored; left: divert-cni, empty socket dir, %s's pins (captured); deleted, its pins stayed until divert gc; no release objects", nodeLate)
}

func sameJSON(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return fmt.Sprint(x) == fmt.Sprint(y)
}
