package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Native sidecars and a second pod id on a captured pod.

// TestNativeSidecar: Istio's native sidecar (istio-proxy an init container with
// restartPolicy: Always) after divert as istio-init. The app's init container after the
// sidecar runs while the proxy already does: its connection must go through it, as the
// app's own later do. Node mode's native pod (a non-1337 proxy uid) is in TestNodeMode.
func TestNativeSidecar(t *testing.T) {
	t.Run("init", func(t *testing.T) { initLog(t, nativeInit, ebpf) })
	t.Run("app-init-through-sidecar", func(t *testing.T) {
		r := scenario(t)
		r.note("%s", appInitThroughSidecar(t, nativeInit))
	})
	t.Run("outbound", func(t *testing.T) { outbound(t, nativeInit) })
	t.Run("inbound", func(t *testing.T) { inbound(t, nativeInit, addr(nativeInit, appPort)) })
}

// appInitThroughSidecar checks what the pod's app-init container saw: its dial to plain's
// Service went through the sidecar (original destination the Service address) to plain.
func appInitThroughSidecar(t *testing.T, pod string) string {
	t.Helper()
	out, err := suite.c.Kubectl(ctx, "logs", "-n", namespace, pod, "-c", "app-init")
	if err != nil {
		t.Fatal(err)
	}
	var res result
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &res); err != nil {
		t.Fatalf("app-init's output %q: %v", out, err)
	}
	if err := check(res,
		want{who: pod + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: vip(plainName)},
		want{who: plainName, local: addr(plainName, appPort)}); err != nil {
		t.Fatalf("app-init (an init container after the sidecar): %v", err)
	}
	return path(res)
}

// pinsUntouched: nothing was pinned, not even half, for the refused id, and the holder's
// attachment is whole by divert status (this build's, run on the host against the cluster's
// bpffs): every program linked, not inert, and healthy if the pod runs.
func pinsUntouched(t *testing.T, holder, refused string, wantHealthy bool) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(suite.c.BPFFS, "divert"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.Contains(e.Name(), refused) {
			t.Fatalf("%s is in the bpffs after the refused attach of %s", e.Name(), refused)
		}
	}
	// An attach stages its pins next to the pods' and moves them in at the end.
	if staged, _ := os.ReadDir(filepath.Join(suite.c.BPFFS, "divert_staging")); len(staged) > 0 {
		t.Fatalf("the refused attach of %s left %s in divert_staging", refused, staged[0].Name())
	}
	out, err := runHost(suite.bins.Divert, "status", "--bpffs", suite.c.BPFFS, "--pod-id", holder, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st []struct {
		ID       string `json:"id"`
		Inert    bool   `json:"inert"`
		Health   string `json:"health"`
		Programs []struct {
			Name   string `json:"name"`
			LinkID uint32 `json:"linkId"`
		} `json:"programs"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st) != 1 || st[0].ID != holder {
		t.Fatalf("divert status of %s: %v\n%s", holder, err, out)
	}
	if st[0].Inert || len(st[0].Programs) == 0 || (wantHealthy && st[0].Health != "healthy") {
		t.Fatalf("%s's attachment after the refusal: %s", holder, out)
	}
	for _, p := range st[0].Programs {
		if p.LinkID == 0 {
			t.Fatalf("%s's program %s has no link after the refusal: %s", holder, p.Name, out)
		}
	}
}

// runHost runs a command on the host (as the test, root) and returns its stdout.
func runHost(name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// nodeDupPod is captured by its own istio-init under a pod id of its own choosing
// (DIVERT_POD_ID), not its UID, and carries no sidecar annotation: the agent leaves it
// alone at CNI ADD. The test labels it for capture once it runs (nodePodsUp).
func nodeDupPod(name, bpffs string) obj {
	p := meshedPod(name, ebpf, noValidate, outboundPrt, bpffs)
	setEnv(p["spec"].(obj)["initContainers"].([]obj)[0], "DIVERT_POD_ID", name+"-init")
	return p
}

// nodeSecondPodIDRefused: node-dup was labelled for capture before the agent restart; the
// new agent's first reconcile then attached it under its UID over the init container's
// attachment. The agent must refuse and say so, pin nothing for the UID, and leave the
// init container's capture in place: the app's connections still go through its proxy.
func nodeSecondPodIDRefused(t *testing.T) {
	r := scenario(t)
	holder := nodeDup + "-init"
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", agentNS, "-l", agentLabel, "--tail=-1")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "pod "+holder+" already captures this cgroup") {
			line = l
		}
	}
	if line == "" {
		t.Fatalf("the agent did not log refusing %s (held by %s):\n%s", nodeDup, holder, tailLines(logs, 15))
	}
	pinsUntouched(t, holder, suite.uids[nodeDup], true)
	// The refusal is an attach the agent failed, counted for operators.
	if n := scrapeMetrics(t)[`divert_agent_errors_total{operation="attach"}`]; n < 1 {
		t.Errorf("divert_agent_errors_total{operation=\"attach\"} = %v after the agent refused %s, want at least 1", n, nodeDup)
	}
	expect(t, r, nodeDup, "app", addr(plainName, appPort),
		want{who: nodeDup + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
		want{who: plainName})
	_, msg, _ := strings.Cut(line, "err=")
	r.note("agent refused: %s; still captured by %s", msg, holder)
}
