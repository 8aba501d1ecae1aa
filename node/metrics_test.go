package node_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func scrape(a *node.Agent) string {
	var b strings.Builder
	a.WriteMetrics(&b)
	return b.String()
}

func requireMetrics(t *testing.T, metrics string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(metrics, w+"\n") {
			t.Errorf("metrics lack %q:\n%s", w, metrics)
		}
	}
}

// Pods attached by an init container, not by the agent, are exported under their names:
// the name the init container kept beside the pins (divert's injector template passes
// $POD_NAMESPACE/$POD_NAME), or, for istio-init from Istio's own template (no name), the
// pod the API lists under that UID. Their counters count the connections made.
func TestMetricsInitContainerPods(t *testing.T) {
	// Unselected (no sidecar status), as the agent sees a pod istio-init captured: it
	// leaves their pins alone.
	named, unnamed := meshedPod(newUID()), meshedPod(newUID())
	named.Annotations, unnamed.Annotations = nil, nil
	a := &node.Agent{Client: fake.NewClientset(named, unnamed), NodeName: "node-1", Loader: divertest.BPFFS(t), Defaults: policy.Default()}
	net := testpod.NewNetwork(t)
	ctx := context.Background()
	var pods []*testpod.Pod
	for _, p := range []struct {
		pod  *corev1.Pod
		name string
	}{{named, named.Namespace + "/" + named.Name}, {unnamed, ""}} {
		tp := net.AddPod(t)
		if err := loader.Attach(ctx, loader.Pod{ID: string(p.pod.UID), Cgroup: tp.CgroupPath, NetNS: tp.NetNSPath, Name: p.name}, divertest.Config(t), a.Loader); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { loader.Detach(string(p.pod.UID), a.Loader) })
		tp.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
		pods = append(pods, tp)
	}
	labels := func(p *corev1.Pod, ns, name string) string {
		return fmt.Sprintf(`pod_uid=%q,namespace=%q,pod=%q`, p.UID, ns, name)
	}
	// Before the agent has listed the node's pods, only the pinned name is known.
	m := scrape(a)
	requireMetrics(t, m, "divert_pods_attached 2")
	for _, want := range []string{labels(named, named.Namespace, named.Name), labels(unnamed, "", "")} {
		if !strings.Contains(m, "divert_pod_healthy{"+want+",") {
			t.Errorf("metrics lack divert_pod_healthy{%s,...}:\n%s", want, m)
		}
	}
	if err := a.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	// Three connections from one pod, two from the other, all redirected.
	for i, n := range []int{3, 2} {
		targets := make([]testpod.Target, n)
		for j := range targets {
			targets[j] = testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], uint16(8000+j))}
		}
		for _, r := range pods[i].Dial(t, divertest.AppUID, divertest.AppUID, targets...) {
			if len(r.Hops) != 1 || r.Hops[0].Who != "proxy" {
				t.Fatalf("pod %d: %+v did not reach the proxy", i, r)
			}
		}
	}
	m = scrape(a)
	requireMetrics(t, m,
		`divert_verdicts_total{`+labels(named, named.Namespace, named.Name)+`,reason="included-cidr"} 3`,
		`divert_verdicts_total{`+labels(unnamed, unnamed.Namespace, unnamed.Name)+`,reason="included-cidr"} 2`,
		`divert_drops_total{`+labels(named, named.Namespace, named.Name)+`,reason="orig-dst-unsent"} 0`,
		`divert_agent_errors_total{operation="attach"} 0`)
	if strings.Contains(m, `namespace="",pod=""`) {
		t.Errorf("a pod is exported without its name after reconcile:\n%s", m)
	}
}

// The agent counts its failed operations by kind: a CNI ADD it refused (the pod does not
// start), a re-attach of a pod with pins that failed, a reconcile that could not list pods.
func TestMetricsAgentErrors(t *testing.T) {
	bad := meshedPod(newUID())
	bad.Annotations["traffic.sidecar.istio.io/excludeOutboundPorts"] = "http"
	client := fake.NewClientset(bad)
	a := &node.Agent{Client: client, NodeName: "node-1", Loader: divertest.BPFFS(t), Defaults: policy.Default()}
	ctx := context.Background()
	add := func() error {
		_, err := a.Add(ctx, node.Request{Command: "ADD", Netns: "/proc/self/ns/net",
			PodNamespace: bad.Namespace, PodName: bad.Name, PodUID: string(bad.UID), IPs: []string{"198.18.0.5"}})
		return err
	}
	requireMetrics(t, scrape(a), `divert_agent_errors_total{operation="attach"} 0`, `divert_agent_errors_total{operation="update"} 0`,
		`divert_agent_errors_total{operation="detach"} 0`, `divert_agent_errors_total{operation="reconcile"} 0`)
	if err := add(); err == nil {
		t.Fatal("a pod with a bad annotation was captured")
	}
	if _, err := a.Add(ctx, node.Request{Command: "ADD", PodNamespace: "shop", PodName: "nobody"}); err == nil {
		t.Fatal("ADD of a pod the API does not know succeeded")
	}
	// The same pod with pins (istio-init captured it, say): its failed attach is an update.
	pod := testpod.New(t)
	if err := loader.Attach(ctx, loader.Pod{ID: string(bad.UID), Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}, divertest.Config(t), a.Loader); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(string(bad.UID), a.Loader) })
	if err := add(); err == nil {
		t.Fatal("a pod with a bad annotation was attached again")
	}
	client.PrependReactor("list", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("the API is down")
	})
	if err := a.Reconcile(ctx, false); err == nil {
		t.Fatal("reconcile without the API succeeded")
	}
	requireMetrics(t, scrape(a), `divert_agent_errors_total{operation="attach"} 2`, `divert_agent_errors_total{operation="update"} 1`,
		`divert_agent_errors_total{operation="detach"} 0`, `divert_agent_errors_total{operation="reconcile"} 1`)
}
