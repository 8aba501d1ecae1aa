package node_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshdivert/divert/internal/crashpoint"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

var (
	crashSeed  = flag.Uint64("crash.seed", 0, "seed for the kill times of TestAgentKilled (0: a new one, printed)")
	crashKills = flag.Int("crash.kills", 48, "kills in TestAgentKilled, spread over add, refresh, update and del")
	stormPods  = flag.Int("storm.pods", 100, "pods set up at once in TestCNIAddStorm")
)

const agentChildEnv = "DIVERT_AGENT_CHILD"

// agentJob is what an agent child process does: one CNI ADD or DEL, or the refresh of
// every pod an agent does when it starts.
type agentJob struct {
	Op         string // "add", "del", "refresh"
	Pod        *corev1.Pod
	Netns      string
	IPs        []string
	CgroupRoot string
	BPFFS      string
}

func (j agentJob) run(ctx context.Context) error {
	a := &node.Agent{Client: fake.NewClientset(j.Pod), NodeName: "node-1", CgroupRoot: j.CgroupRoot,
		Loader: loader.Options{BPFFS: j.BPFFS}, Defaults: policy.Default(), Log: slog.New(slog.DiscardHandler)}
	req := node.Request{Netns: j.Netns, PodNamespace: j.Pod.Namespace, PodName: j.Pod.Name, PodUID: string(j.Pod.UID), IPs: j.IPs}
	var err error
	switch j.Op {
	case "add":
		_, err = a.Add(ctx, req)
	case "del":
		_, err = a.Del(ctx, req)
	case "refresh":
		err = a.Reconcile(ctx, true)
	}
	return err
}

func runAgentChildIfRequested() {
	v := os.Getenv(agentChildEnv)
	if v == "" {
		return
	}
	crashpoint.ArmFromEnv()
	var job agentJob
	err := json.Unmarshal([]byte(v), &job)
	if err == nil {
		err = job.run(context.Background())
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// agentCmd is an agent child process doing job, not started yet.
func agentCmd(job agentJob) (*exec.Cmd, *bytes.Buffer) {
	b, _ := json.Marshal(job)
	return divertest.ChildCmd(agentChildEnv + "=" + string(b))
}

// The node agent killed (SIGKILL) at random times (seeded; -crash.seed replays,
// -crash.kills runs longer) while it captures a pod (CNI ADD), refreshes it on start,
// updates it (ADD again after the pod's annotations changed) and releases it (CNI DEL):
// after each kill the pod is captured whole or not at all (a refresh or an update never
// uncaptures it), and the same call by the next agent repairs: attached once with the
// annotations' policy as the kernel holds it, or nothing left.
func TestAgentKilled(t *testing.T) {
	rng, seed := divertest.CrashRand(t, *crashSeed, "crash.seed")

	net := testpod.NewNetwork(t)
	tp := net.AddPod(t)
	root := cgroupRoot(t)
	opts := divertest.BPFFS(t)
	p := meshedPod(newUID())
	tp.CgroupPath = filepath.Join(root, node.ExpectedPodCgroup(p))
	if err := os.MkdirAll(tp.CgroupPath, 0o755); err != nil {
		t.Fatal(err)
	}
	probe := divertest.NewCrashProbe(t, tp)
	t.Cleanup(func() { loader.Detach(string(p.UID), opts) })

	annotations := []map[string]string{
		{node.AnnotationIstioStatus: "{}", "traffic.sidecar.istio.io/excludeOutboundPorts": "3306",
			"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12", "traffic.sidecar.istio.io/excludeInboundPorts": "9000"},
		{node.AnnotationIstioStatus: "{}", "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
			"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8"},
	}
	podWith := func(i int) *corev1.Pod {
		q := p.DeepCopy()
		q.Annotations = annotations[i]
		return q
	}
	job := func(op string, pod *corev1.Pod) agentJob {
		return agentJob{Op: op, Pod: pod, Netns: tp.NetNSPath, IPs: []string{tp.Addr.String()}, CgroupRoot: root, BPFFS: opts.BPFFS}
	}
	type step struct {
		name string
		job  agentJob
	}
	// A cycle: each call starts from the state the previous one's re-run left.
	cycle := []step{
		{"add", job("add", podWith(0))},
		{"refresh", job("refresh", podWith(0))},
		{"update", job("add", podWith(1))},
		{"del", job("del", podWith(1))},
	}

	var names []string
	for _, s := range cycle {
		names = append(names, s.name)
	}
	plans := divertest.KillPlans(t, names, func(i int) (*exec.Cmd, *bytes.Buffer) { return agentCmd(cycle[i].job) })

	// An agent killed between moving a new pod's pins into place and arming them leaves
	// the pod inert; the periodic reconcile (no refresh) must finish it, not skip it as
	// attached.
	reconcile := func() error {
		a := &node.Agent{Client: fake.NewClientset(podWith(0)), NodeName: "node-1", CgroupRoot: root,
			Loader: opts, Defaults: policy.Default(), Log: slog.New(slog.DiscardHandler)}
		return a.Reconcile(context.Background(), false)
	}
	cmd, out := agentCmd(cycle[0].job)
	cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d,0", crashpoint.Env, plans["add"].Steps-1))
	if err := cmd.Run(); err == nil {
		t.Fatalf("agent not killed before arming:\n%s", out)
	}
	if _, last := crashpoint.Steps(out.String()); last != "commit" {
		t.Fatalf("agent killed after %q, want after commit", last)
	}
	if inert, err := loader.Inert(string(p.UID), opts); err != nil || !inert {
		t.Fatalf("killed before arming: inert %v, %v", inert, err)
	}
	if err := reconcile(); err != nil {
		t.Fatal(err)
	}
	cfg0, _, _ := node.Config(podWith(0), policy.Default())
	if err := errors.Join(divertest.CheckAttachedOnce(tp, opts, string(p.UID)), divertest.CheckPolicy(opts, string(p.UID), &cfg0)); err != nil {
		t.Fatalf("reconcile of an inert pod: %v", err)
	}
	if captured, err := probe.Captured(t); err != nil || !captured {
		t.Fatalf("reconcile of an inert pod: captured %v, %v", captured, err)
	}
	if err := loader.Detach(string(p.UID), opts); err != nil {
		t.Fatal(err)
	}

	outcome := map[string]int{}
	begin := time.Now()
	for i := range *crashKills {
		s := cycle[i%len(cycle)]
		cmd, out := agentCmd(s.job)
		killed, aim, err := plans[s.name].Kill(rng, cmd)
		_, last := crashpoint.Steps(out.String())
		at := fmt.Sprintf("kill %d (%s, %s, last step %q, seed %d)", i, s.name, aim, last, seed)
		if err != nil {
			t.Fatalf("%s: %v\n%s", at, err, out)
		}

		captured, err := probe.Captured(t)
		if err != nil {
			t.Fatalf("%s: %v", at, err)
		}
		if (s.name == "refresh" || s.name == "update") && !captured {
			t.Fatalf("%s: an interrupted %s left the pod uncaptured", at, s.name)
		}
		outcome[fmt.Sprintf("%s: killed=%v captured=%v", s.name, killed, captured)]++

		// The next agent makes the same call; for every other ADD, the agent's periodic
		// reconcile (no refresh) repairs instead, as when the runtime gave up on the pod.
		if s.name == "add" && i%8 == 4 {
			if err := reconcile(); err != nil {
				t.Fatalf("%s: reconcile: %v", at, err)
			}
		} else if err := s.job.run(context.Background()); err != nil {
			t.Fatalf("%s: run again: %v", at, err)
		}
		if s.name == "del" {
			if err := divertest.CheckNothingLeft(tp, opts); err != nil {
				t.Fatalf("%s: after del again: %v", at, err)
			}
			continue
		}
		if err := divertest.CheckAttachedOnce(tp, opts, string(p.UID)); err != nil {
			t.Fatalf("%s: after %s again: %v", at, s.name, err)
		}
		cfg, _, err := node.Config(s.job.Pod, policy.Default())
		if err != nil {
			t.Fatal(err)
		}
		if err := divertest.CheckPolicy(opts, string(p.UID), &cfg); err != nil {
			t.Fatalf("%s: after %s again: %v", at, s.name, err)
		}
	}
	var lines []string
	for k, n := range outcome {
		lines = append(lines, fmt.Sprintf("%s: %d", k, n))
	}
	slices.Sort(lines)
	t.Logf("%d kills in %v\n%s", *crashKills, time.Since(begin).Round(time.Millisecond), strings.Join(lines, "\n"))
}

// A CNI ADD storm: -storm.pods meshed pods set up at once through the CNI chain (ptp, then
// divert-cni in real network namespaces). Every pod is captured, once, none is refused;
// one of them is checked with real traffic; a DEL storm then leaves nothing.
func TestCNIAddStorm(t *testing.T) {
	n := *stormPods
	var pods []*corev1.Pod
	for i := range n {
		p := meshedPod(newUID())
		p.Name = fmt.Sprintf("storm-%d", i) // meshedPod's names may collide among 100
		pods = append(pods, p)
	}
	w := newCNIWorld(t, pods...)
	w.agent.Log = slog.New(slog.DiscardHandler)
	list := w.conflist(t, w.socket, false)
	opts := w.agent.Loader
	tps := make([]*testpod.Pod, n)
	for i, p := range pods {
		tps[i] = &testpod.Pod{Name: p.Name, NetNSPath: podNetns(t), CgroupPath: filepath.Join(w.cgroups, node.ExpectedPodCgroup(p)), Net: w.net}
	}
	t.Cleanup(func() {
		for _, p := range pods {
			loader.Detach(string(p.UID), opts)
		}
	})

	storm := func(op string) time.Duration {
		start := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i, p := range pods {
			wg.Go(func() {
				res, err := w.cni(t, list, op, p, tps[i].NetNSPath)
				if err == nil && op == "ADD" {
					tps[i].Addr = addrOf(res)
				}
				errs[i] = err
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("CNI %s storm of %d pods: %v", op, n, err)
		}
		return time.Since(start)
	}

	add := storm("ADD")
	for i, p := range pods {
		if err := divertest.CheckPolicy(opts, string(p.UID), mustConfig(t, p)); err != nil {
			t.Errorf("pod %d: %v", i, err)
		}
		kinds, err := divertest.ProgramsByKind(tps[i])
		if err != nil {
			t.Fatal(err)
		}
		for _, at := range divertest.Kinds {
			if kinds[at] != 1 {
				t.Errorf("pod %d: programs attached %v, want one of each", i, kinds)
				break
			}
		}
	}
	if ids, _ := loader.List(opts); len(ids) != n {
		t.Errorf("%d pods attached after %d ADDs", len(ids), n)
	}
	if got, _ := os.ReadDir(filepath.Join(opts.BPFFS, "divert_staging")); len(got) != 0 {
		t.Errorf("staging left behind: %v", got)
	}
	probe := divertest.NewCrashProbe(t, tps[n/2])
	if captured, err := probe.Captured(t); err != nil || !captured {
		t.Errorf("pod %d after the storm: captured %v, %v", n/2, captured, err)
	}

	del := storm("DEL")
	for i := range tps {
		if err := divertest.CheckNothingLeft(tps[i], opts); err != nil {
			t.Errorf("pod %d after DEL: %v", i, err)
		}
	}
	t.Logf("%d pods: ADD storm %v, DEL storm %v", n, add.Round(time.Millisecond), del.Round(time.Millisecond))
}

func mustConfig(t *testing.T, p *corev1.Pod) *policy.Config {
	cfg, _, err := node.Config(p, policy.Default())
	if err != nil {
		t.Fatal(err)
	}
	return &cfg
}
