package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// initLog checks what the pod's istio-init container said it did, and whether the pod's
// pins are in the cluster's bpffs (they must be for eBPF, and must not be for iptables).
func initLog(t *testing.T, pod string, b backend) {
	r := scenario(t)
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", namespace, pod, "-c", "istio-init")
	if err != nil {
		t.Fatal(err)
	}
	logs = strings.TrimSpace(logs)
	// The table shows where the pod's cgroup was found (with the pod's UID elided), or the
	// iptables line as is.
	r.note("%s", strings.ReplaceAll(logs, "\n", "; "))
	if m := regexp.MustCompile(`with eBPF: cgroup (\S+) \(([^,)]*)`).FindStringSubmatch(logs); m != nil {
		r.note("eBPF, pinned; pod cgroup %s (%s)", strings.ReplaceAll(m[1], suite.uids[pod], "<uid>"), m[2])
	}
	_, err = os.Stat(filepath.Join(suite.c.BPFFS, "divert", suite.uids[pod]))
	switch b {
	case ebpf:
		if !strings.Contains(logs, "with eBPF") {
			t.Fatalf("istio-init did not attach with eBPF: %q", logs)
		}
		if err != nil {
			t.Fatalf("no pins for pod uid %s: %v", suite.uids[pod], err)
		}
	case iptables, fallback:
		if !strings.Contains(logs, "iptables rules") {
			t.Fatalf("istio-init did not write iptables rules: %q", logs)
		}
		if b == fallback && !strings.Contains(logs, "eBPF capture is not possible") {
			t.Fatalf("istio-init fell back to iptables without saying why: %q", logs)
		}
		if err == nil {
			t.Fatalf("pins for pod uid %s exist with --mode iptables", suite.uids[pod])
		}
	}
}

// TestInitContainer is istio-init's deployment: divert runs once as the pod's init
// container and exits before the proxy and the app start; capture must outlive it.
func TestInitContainer(t *testing.T) {
	for _, p := range []struct {
		name, pod string
		b         backend
		inLocal   string // the proxy's local address for inbound (see inbound)
	}{
		{"ebpf-istio-template", meshA, ebpf, addr(meshA, appPort)},
		{"ebpf-host-cgroup", meshB, ebpf, addr(meshB, appPort)},
		{"iptables-istio-template", meshIpt, iptables, addr(meshIpt, inboundPrt)},
		{"auto-falls-back-to-iptables", meshAuto, fallback, addr(meshAuto, inboundPrt)},
	} {
		t.Run(p.name+"/init", func(t *testing.T) { initLog(t, p.pod, p.b) })
		t.Run(p.name+"/outbound", func(t *testing.T) { outbound(t, p.pod) })
		t.Run(p.name+"/outbound-v4-mapped", func(t *testing.T) { outboundV4Mapped(t, p.pod) })
		t.Run(p.name+"/inbound", func(t *testing.T) { inbound(t, p.pod, p.inLocal) })
	}
}

// TestMesh is the full sidecar path between two meshed pods: the client app's connection
// leaves through its own proxy (outbound capture), enters the server pod through the
// server's proxy (inbound capture) and reaches the server app from 127.0.0.6, each proxy
// reading the server app's address as the original destination. Mixed backends too: a pod
// on the iptables fallback must interoperate with eBPF pods.
func TestMesh(t *testing.T) {
	for _, p := range []struct{ from, to, toLocal string }{
		{meshA, meshB, ""},
		{meshB, meshA, ""},
		{meshA, meshIpt, addr(meshIpt, inboundPrt)},
		{meshIpt, meshB, addr(meshB, appPort)},
	} {
		t.Run(p.from+"->"+p.to, func(t *testing.T) {
			r := scenario(t)
			local := p.toLocal
			if local == "" {
				local = addr(p.to, appPort)
			}
			expect(t, r, p.from, "app", addr(p.to, appPort),
				want{who: p.from + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(p.to, appPort)},
				want{who: p.to + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(p.to, appPort), local: local},
				want{who: p.to + "-app", peerIP: "127.0.0.6"})
		})
	}
}

// TestBrokenCaptureIsDetected is the suite judging itself: mesh-broken's init container
// attaches with -p 15002 while its proxy listens on 15001, so its app's outbound
// connections are redirected to a port nothing listens on. The same check the other rows
// use must reject that; if it ever passes, the suite cannot tell a broken capture from a
// working one. (-k8s.break does the same to mesh-a, and then the suite fails.)
func TestBrokenCaptureIsDetected(t *testing.T) {
	r := scenario(t)
	res, err := dial(meshBroken, "app", addr(plainName, appPort))
	if err != nil {
		t.Fatal(err)
	}
	err = check(res,
		want{who: meshBroken + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
		want{who: plainName})
	if err == nil {
		t.Fatalf("a capture to the wrong proxy port passed the check: %s", path(res))
	}
	// Captured, but to the wrong port: refused, never reaching the server directly.
	if res.Err != "connection refused" {
		t.Fatalf("want the redirected connection refused (nothing on %s), got %q via %s", wrongPort, res.Err, path(res))
	}
	r.note("detected as intended: %v", err)
}

// TestSecondPodID: dup-init's istio-init attached the pod under its UID; its second divert
// init container asks for the same cgroup under another pod id. It must fail with one line
// naming the pod that holds the cgroup, pin nothing, and leave the first attachment as it
// was (issue 21, item 1). It runs before TestNodeMode (this file sorts first): the node
// agent removes the pins of a Failed pod, which dup-init is.
func TestSecondPodID(t *testing.T) {
	r := scenario(t)
	var pod struct {
		Metadata struct {
			UID string `json:"uid"`
		} `json:"metadata"`
		Status struct {
			Phase    string `json:"phase"`
			Statuses []struct {
				Name  string `json:"name"`
				State struct {
					Terminated *struct {
						ExitCode int `json:"exitCode"`
					} `json:"terminated"`
				} `json:"state"`
			} `json:"initContainerStatuses"`
		} `json:"status"`
	}
	if err := suite.c.WaitFor(ctx, dupInit+" failed", 90*time.Second, func() error {
		out, err := suite.c.Kubectl(ctx, "get", "pod", "-n", namespace, dupInit, "-o", "json")
		if err != nil {
			return err
		}
		if err := json.Unmarshal([]byte(out), &pod); err != nil {
			return err
		}
		if pod.Status.Phase != "Failed" {
			return fmt.Errorf("phase %s", pod.Status.Phase)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, suite.describe())
	}
	var status struct {
		UID    string
		Second struct{ ExitCode int }
	}
	status.UID = pod.Metadata.UID
	for _, c := range pod.Status.Statuses {
		if c.Name == "istio-init-again" && c.State.Terminated != nil {
			status.Second.ExitCode = c.State.Terminated.ExitCode
		} else if c.Name == "istio-init-again" {
			t.Fatalf("the second init container has not terminated in a Failed pod: %+v", pod.Status)
		}
	}
	if status.Second.ExitCode == 0 {
		t.Fatalf("the second init container exited 0")
	}
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", namespace, dupInit, "-c", "istio-init-again")
	if err != nil {
		t.Fatal(err)
	}
	logs = strings.TrimSpace(logs)
	if strings.Count(logs, "\n") != 0 || !strings.Contains(logs, "pod "+status.UID+" already captures this cgroup") {
		t.Fatalf("want one line naming pod %s as the holder, got:\n%s", status.UID, logs)
	}
	// The pod failed, so its proxy never listened (and the kubelet may be removing its
	// cgroup): the holder's health is not the point, only that its attachment is whole.
	pinsUntouched(t, status.UID, secondID(dupInit), false)
	r.note("refused (exit %d): %s", status.Second.ExitCode, strings.ReplaceAll(logs, status.UID, "<uid>"))
}
