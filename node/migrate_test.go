package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node"
	"github.com/meshdivert/divert/node/handback"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// A running pod moves from istio-init's capture (istio's iptables rules) to the node agent
// and back, with an app dialling out and a client outside dialling in every 20 ms
// throughout: every connection of every phase (iptables alone, both, eBPF alone, both,
// iptables alone) reaches the proxy with its original destination, and each move leaves
// nothing of the other capture behind.
func TestLiveMigration(t *testing.T) {
	p := meshedPod(newUID())
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodInitialized, Status: corev1.ConditionTrue}}
	w := newCNIWorld(t, p)
	ctx := context.Background()
	cg := filepath.Join(w.cgroups, node.ExpectedPodCgroup(p))
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	pod := w.net.AddPod(t)
	pod.CgroupPath = cg
	probe := divertest.NewCrashProbe(t, pod) // remote :80, app :8080, proxy :15001 and :15006
	id := string(p.UID)

	cfg := istioInit(t, p, pod)
	loop := func(start func(testpod.ProcSpec) *testpod.Proc, uid uint32, tgt testpod.Target) *testpod.Proc {
		return start(testpod.ProcSpec{UID: uid, GID: uid, Args: []string{"client", "--timeout", "3s",
			"--for", "10m", "--interval", "20ms", "--target", tgt.String()}})
	}
	out := loop(func(s testpod.ProcSpec) *testpod.Proc { return pod.Start(t, s) }, divertest.AppUID, probe.Out)
	in := loop(func(s testpod.ProcSpec) *testpod.Proc { return w.net.Start(t, s) }, 0, probe.In)
	// A phase is the connections from the end of the one before to a few after its move;
	// those made after the move (but the first, which may have been decided during it) are
	// all captured by the phase's capture, outbound and inbound.
	type phaseMark struct {
		name       string
		moved, end [2]int
		capture    [2]string
	}
	var phases []phaseMark
	phase := func(name, outCapture, inCapture string) {
		t.Helper()
		moved := [2]int{lines(out) + 1, lines(in) + 1}
		want := [2]int{moved[0] + 5, moved[1] + 5}
		for deadline := time.Now().Add(30 * time.Second); lines(out) < want[0] || lines(in) < want[1]; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("phase %s: the loops made %d and %d connections, want %v", name, lines(out), lines(in), want)
			}
		}
		phases = append(phases, phaseMark{name, moved, [2]int{lines(out), lines(in)}, [2]string{outCapture, inCapture}})
	}
	istioRules := func() []iptables.Backend {
		t.Helper()
		b, err := iptables.Installed(ctx, pod.NetNSPath)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	phase("iptables", "iptables", "iptables")

	// An agent told to keep istio's rules captures the pod beside them.
	keeper := &node.Agent{Client: w.agent.Client, NodeName: "node-1", CgroupRoot: w.cgroups, Loader: w.agent.Loader,
		Defaults: policy.Default(), KeepIstioIptables: true}
	if err := keeper.Reconcile(ctx, true); err != nil {
		t.Fatal(err)
	}
	if len(istioRules()) == 0 {
		t.Fatal("--keep-istio-iptables: the agent removed istio's rules")
	}
	if ids, _ := loader.List(w.agent.Loader); len(ids) != 1 || ids[0] != id {
		t.Fatalf("the agent did not attach the running pod: pins %v", ids)
	}
	// With both: eBPF's connect hook decides outbound first (istio's rules return
	// 127.0.0.1), nat PREROUTING's REDIRECT decides inbound before sk_lookup.
	phase("both, forward", "eBPF", "iptables")

	// The agent as installed: it finds the pod attached and takes istio's rules out.
	if err := w.agent.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if b := istioRules(); len(b) != 0 {
		t.Fatalf("after the agent's reconcile istio's rules are still in %v", b)
	}
	var m strings.Builder
	w.agent.WriteMetrics(&m)
	if !strings.Contains(m.String(), `divert_agent_errors_total{operation="remove-istio-iptables"} 0`) {
		t.Errorf("metrics lack the removal's error count at 0:\n%s", m.String())
	}
	phase("ebpf", "eBPF", "eBPF")

	// Back: istio's rules for the policy in the pod's maps, then the programs go.
	var results []handback.Result
	err := handback.Run(ctx, handback.Options{Loader: w.agent.Loader, CgroupRoot: w.cgroups, DryRun: true},
		func(r handback.Result) { results = append(results, r) })
	if err != nil || len(results) != 1 || results[0].ID != id || results[0].NetNS == "" {
		t.Fatalf("dry run: %v %+v", err, results)
	}
	if len(istioRules()) != 0 {
		t.Fatal("the dry run applied istio's rules")
	}
	results = nil
	err = handback.Run(ctx, handback.Options{Loader: w.agent.Loader, CgroupRoot: w.cgroups},
		func(r handback.Result) { results = append(results, r) })
	if err != nil || len(results) != 1 || results[0].Err != nil || results[0].Backend == "" {
		t.Fatalf("hand back: %v %+v", err, results)
	}
	if ids, _ := loader.List(w.agent.Loader); len(ids) != 0 {
		t.Fatalf("pins left after the hand back: %v", ids)
	}
	kinds, err := divertest.ProgramsByKind(pod)
	if err != nil {
		t.Fatal(err)
	}
	for at, n := range kinds {
		if n != 0 {
			t.Fatalf("%d %s programs left on the pod", n, at)
		}
	}
	phase("iptables again", "iptables", "iptables")
	// The rules are istio-init's for the pod: the same as in a pod it set up itself.
	fresh := w.net.AddPod(t)
	if _, err := iptables.Apply(ctx, fresh.NetNSPath, &cfg); err != nil {
		t.Fatal(err)
	}
	if got, want := savedRules(t, pod.NetNSPath), savedRules(t, fresh.NetNSPath); got != want {
		t.Errorf("handed back rules:\n%s\nistio-init's for the pod:\n%s", got, want)
	}

	out.Stop()
	in.Stop()
	conns := [2][]testpod.Result{clientResults(t, out), clientResults(t, in)}
	start := [2]int{}
	for _, ph := range phases {
		for i, dir := range []string{"outbound", "inbound"} {
			for n := start[i]; n < ph.end[i]; n++ {
				r := conns[i][n]
				if len(r.Hops) != 1 || r.Hops[0].Who != "proxy" || r.Hops[0].Orig != r.Dst {
					t.Errorf("phase %s, %s connection %d to %s escaped: %+v", ph.name, dir, n, r.Dst, r)
					continue
				}
				if got := captureOf(r.Hops[0], dir, pod.Addr); n > ph.moved[i] && got != ph.capture[i] {
					t.Errorf("phase %s, %s connection %d captured by %s, want %s: %+v", ph.name, dir, n, got, ph.capture[i], r.Hops[0])
				}
			}
		}
		t.Logf("phase %s: %d outbound and %d inbound connections", ph.name, ph.end[0]-start[0], ph.end[1]-start[1])
		start = ph.end
	}
}

// captureOf tells which capture took a connection, by its addresses: eBPF's outbound
// connect goes to 127.0.0.1 from 127.0.0.1, REDIRECT's keeps the pod's address as source;
// sk_lookup hands inbound over unchanged, REDIRECT rewrites it to :15006.
func captureOf(h testpod.Hop, dir string, podAddr netip.Addr) string {
	if dir == "outbound" {
		if peer, err := netip.ParseAddrPort(h.Peer); err == nil && peer.Addr() == podAddr {
			return "iptables"
		}
		return "eBPF"
	}
	if h.Local == netip.AddrPortFrom(podAddr, 15006).String() {
		return "iptables"
	}
	return "eBPF"
}

// savedRules is iptables-save of the netns (both backends), with each run of consecutive
// RETURN rules of a chain sorted: the maps hold port and CIDR lists as sets, so the rules
// handed back list them in numeric order where istio-init kept the annotation's, and the
// order of consecutive RETURNs changes nothing of what they capture.
func savedRules(t *testing.T, netns string) string {
	t.Helper()
	var all []string
	for _, save := range []string{"iptables-nft-save", "iptables-legacy-save"} {
		var b []byte
		err := nsexec.Do(netns, func() error {
			var err error
			b, err = exec.Command(save).Output()
			return err
		})
		if err != nil {
			t.Fatalf("%s: %v", save, err)
		}
		var run []string
		flush := func() {
			slices.Sort(run)
			all, run = append(all, run...), nil
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "#") {
				continue
			}
			if strings.HasPrefix(l, "-A ") && strings.HasSuffix(l, " -j RETURN") &&
				(len(run) == 0 || strings.Fields(run[0])[1] == strings.Fields(l)[1]) {
				run = append(run, l)
				continue
			}
			flush()
			all = append(all, l)
		}
		flush()
	}
	return strings.Join(all, "\n")
}

// lines counts the complete result lines a looping client printed.
func lines(pr *testpod.Proc) int { return strings.Count(pr.Stdout(), "\n") }

// clientResults decodes a looping client's complete result lines.
func clientResults(t *testing.T, pr *testpod.Proc) []testpod.Result {
	t.Helper()
	var out []testpod.Result
	for _, l := range strings.SplitAfter(pr.Stdout(), "\n") {
		if !strings.HasSuffix(l, "\n") {
			break // cut short by Stop
		}
		var r testpod.Result
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(fmt.Errorf("client line %q: %w", l, err))
		}
		out = append(out, r)
	}
	return out
}

// A TPROXY pod keeps istio's rules beside divert's programs: their policy route in the
// pod's netns is one divert's TPROXY return path may share, so the agent removes nothing.
func TestAgentKeepsTPROXYRules(t *testing.T) {
	p := meshedPod(newUID())
	p.Annotations[node.AnnotationInterceptionMode] = "TPROXY"
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodInitialized, Status: corev1.ConditionTrue}}
	w := newCNIWorld(t, p)
	pod := runningPod(t, w, p)
	istioInit(t, p, pod)
	ctx := context.Background()
	if err := w.agent.Reconcile(ctx, true); err != nil {
		t.Fatal(err)
	}
	if ids, _ := loader.List(w.agent.Loader); len(ids) != 1 {
		t.Fatalf("the agent did not attach the TPROXY pod: %v", ids)
	}
	if b, err := iptables.Installed(ctx, pod.NetNSPath); err != nil || len(b) == 0 {
		t.Fatalf("the agent removed a TPROXY pod's istio rules: %v %v", b, err)
	}
}

// Pins under the pod's UID whose sk_lookup program is in another netns do not capture the
// pod's inbound: the agent leaves istio's rules, says so, and counts the failure.
func TestAgentKeepsRulesOfPodItDoesNotCapture(t *testing.T) {
	p := meshedPod(newUID())
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodInitialized, Status: corev1.ConditionTrue}}
	w := newCNIWorld(t, p)
	pod := runningPod(t, w, p)
	cfg := istioInit(t, p, pod)
	ctx := context.Background()
	elsewhere := w.net.AddPod(t)
	if err := loader.Attach(ctx, loader.Pod{ID: string(p.UID), Cgroup: pod.CgroupPath, NetNS: elsewhere.NetNSPath}, &cfg, w.agent.Loader); err != nil {
		t.Fatal(err)
	}
	err := w.agent.Reconcile(ctx, false)
	if err == nil || !strings.Contains(err.Error(), "left in place") || !strings.Contains(err.Error(), "netns inode") {
		t.Fatalf("want the removal refused naming the netns, got %v", err)
	}
	if b, err := iptables.Installed(ctx, pod.NetNSPath); err != nil || len(b) == 0 {
		t.Fatalf("the agent removed istio's rules of a pod its sk_lookup does not capture: %v %v", b, err)
	}
	var m strings.Builder
	w.agent.WriteMetrics(&m)
	if !strings.Contains(m.String(), `divert_agent_errors_total{operation="remove-istio-iptables"} 1`) {
		t.Fatalf("the failure is not counted:\n%s", m.String())
	}
}

// istioInit does istio-init's part for p in pod's netns: istio's rules for the pod's policy
// (its annotations, as the injector renders them into istio-init's arguments), which it
// returns.
func istioInit(t *testing.T, p *corev1.Pod, pod *testpod.Pod) policy.Config {
	t.Helper()
	cfg, _, err := node.Config(p, policy.Default())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := iptables.Apply(context.Background(), pod.NetNSPath, &cfg); err != nil {
		t.Fatal(err)
	}
	return cfg
}
