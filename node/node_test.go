package node_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func TestMain(m *testing.M) {
	runCNICallIfRequested()
	testpod.RunHelperIfRequested()
	if plan := os.Getenv(restartedAgentEnv); plan != "" {
		os.Exit(runRestartedAgent(plan))
	}
	runAgentChildIfRequested()
	code := m.Run()
	if pluginBin != "" {
		os.RemoveAll(filepath.Dir(pluginBin))
	}
	os.Exit(code)
}

var (
	buildOnce sync.Once
	pluginBin string
	buildErr  error
)

// pluginBinary builds divert-cni once for the package's tests.
func pluginBinary(t *testing.T) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "divert-cni-")
		if err != nil {
			buildErr = err
			return
		}
		pluginBin = filepath.Join(dir, node.PluginType)
		if out, err := exec.Command("go", "build", "-o", pluginBin, "github.com/meshdivert/divert/cmd/divert-cni").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build divert-cni: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return pluginBin
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// cgroupRoot makes a private stand-in for the host's cgroup2 root, removed (bottom-up, after
// the test's processes are gone) at the end.
func cgroupRoot(t *testing.T) string {
	mnt := divertest.Cgroup2Mount(t)
	root := filepath.Join(mnt, "divert-test", "node-"+randHex(4))
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			for try := 0; try < 50 && os.Remove(dirs[i]) != nil; try++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	})
	return root
}

func meshedPod(uid string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-" + uid[:4], Namespace: "shop", UID: types.UID(uid),
			Annotations: map[string]string{node.AnnotationIstioStatus: "{}", "traffic.sidecar.istio.io/excludeOutboundPorts": "81"}},
		Spec:   corev1.PodSpec{NodeName: "node-1"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, QOSClass: corev1.PodQOSBestEffort},
	}
}

func newUID() string {
	u := randHex(16)
	return fmt.Sprintf("%s-%s-%s-%s-%s", u[:8], u[8:12], u[12:16], u[16:20], u[20:])
}

type cniWorld struct {
	net     *testpod.Network
	agent   *node.Agent
	socket  string
	binDir  string
	cgroups string
}

func newCNIWorld(t *testing.T, pods ...*corev1.Pod) *cniWorld {
	w := &cniWorld{net: testpod.NewNetwork(t), cgroups: cgroupRoot(t), binDir: t.TempDir()}
	w.socket = filepath.Join(t.TempDir(), "cni.sock")
	var objs []runtime.Object
	for _, p := range pods {
		objs = append(objs, p)
	}
	w.agent = &node.Agent{Client: fake.NewClientset(objs...), NodeName: "node-1", CgroupRoot: w.cgroups,
		Loader: divertest.BPFFS(t), Defaults: policy.Default()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.agent.Serve(ctx, w.socket) }()
	t.Cleanup(func() { cancel(); <-done })
	// The plugin as a runtime would find it: built, next to the reference plugins.
	if err := os.Symlink(pluginBinary(t), filepath.Join(w.binDir, node.PluginType)); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"ptp", "host-local", "loopback"} {
		if err := os.Symlink("/usr/lib/cni/"+p, filepath.Join(w.binDir, p)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 100; i++ { // the socket appears once Serve listens
		if _, err := os.Stat(w.socket); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return w
}

func (w *cniWorld) conflist(t *testing.T, socket string, failOpen bool) *libcni.NetworkConfigList {
	subnet := fmt.Sprintf("198.18.%d.0/24", 200+int(randHex(1)[0])%50)
	raw := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"dvt-%s","plugins":[
		{"type":"ptp","ipam":{"type":"host-local","subnet":%q,"dataDir":%q}},
		{"type":"divert-cni","socket":%q,"failOpen":%v,"excludeNamespaces":["kube-system"]}]}`, randHex(3), subnet, t.TempDir(), socket, failOpen)
	list, err := libcni.ConfListFromBytes([]byte(raw))
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// podNetns makes an empty network namespace for CNI to set up, deleted at the end.
func podNetns(t *testing.T) string {
	name := "dvt-cni-" + randHex(4)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	// Runtimes bring lo up (containerd does, or the loopback plugin); the redirect target
	// 127.0.0.1 needs it.
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v %s", err, out)
	}
	return "/run/netns/" + name
}

// cni runs one CNI operation the way a container runtime does, from the "host" netns
// (the test network's remote namespace, so the host's own namespace is never touched).
func (w *cniWorld) cni(t *testing.T, list *libcni.NetworkConfigList, op string, pod *corev1.Pod, netns string) (*types100.Result, error) {
	cni := libcni.NewCNIConfig([]string{w.binDir}, nil)
	rt := &libcni.RuntimeConf{ContainerID: "ctr-" + string(pod.UID)[:8], NetNS: netns, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", pod.Namespace}, {"K8S_POD_NAME", pod.Name}, {"K8S_POD_UID", string(pod.UID)}}}
	var res *types100.Result
	err := nsexec.Do(w.net.NetNSPath, func() error {
		if op == "DEL" {
			return cni.DelNetworkList(context.Background(), list, rt)
		}
		r, err := cni.AddNetworkList(context.Background(), list, rt)
		if err != nil {
			return err
		}
		res, err = types100.NewResultFromResult(r)
		return err
	})
	return res, err
}

// A meshed pod set up through the CNI chain is captured (with its annotations applied),
// and DEL releases it.
func TestCNIAddCapturesMeshedPod(t *testing.T) {
	p := meshedPod(newUID())
	w := newCNIWorld(t, p)
	netns := podNetns(t)
	list := w.conflist(t, w.socket, false)
	res, err := w.cni(t, list, "ADD", p, netns)
	if err != nil {
		t.Fatalf("CNI ADD: %v", err)
	}
	if len(res.IPs) != 1 {
		t.Fatalf("the previous plugin's result must come back unchanged: %+v", res)
	}
	st, err := loader.Status(string(p.UID), w.agent.Loader)
	if err != nil {
		t.Fatalf("pod not attached after ADD: %v", err)
	}
	if len(st.Policy.OutboundExcludePorts) != 1 || st.Policy.OutboundExcludePorts[0] != 81 {
		t.Errorf("annotation excludeOutboundPorts=81 not applied: %+v", st.Policy)
	}

	// The agent created the pod's cgroup where the runtime will put the containers; a
	// process there, in the CNI-made netns, is captured.
	cg := filepath.Join(w.cgroups, node.ExpectedPodCgroup(p))
	pod := &testpod.Pod{Name: p.Name, NetNSPath: netns, CgroupPath: cg, Addr: addrOf(res), Net: w.net}
	pod.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
	dst := netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), 80) // never reached: the proxy answers
	if r := pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: dst})[0]; len(r.Hops) != 1 || r.Hops[0].Orig != dst.String() {
		t.Fatalf("app in the CNI-created pod not captured: %+v", r)
	}

	if _, err := w.cni(t, list, "DEL", p, netns); err != nil {
		t.Fatalf("CNI DEL: %v", err)
	}
	if _, err := loader.Status(string(p.UID), w.agent.Loader); !errors.Is(err, loader.ErrNotAttached) {
		t.Fatalf("pod still attached after DEL: %v", err)
	}
	if _, err := w.cni(t, list, "DEL", p, netns); err != nil {
		t.Fatalf("a second CNI DEL must succeed: %v", err)
	}
}

// Pods without a sidecar are left alone.
func TestCNIAddSkipsUnmeshedPod(t *testing.T) {
	p := meshedPod(newUID())
	p.Annotations = nil
	w := newCNIWorld(t, p)
	if _, err := w.cni(t, w.conflist(t, w.socket, false), "ADD", p, podNetns(t)); err != nil {
		t.Fatalf("CNI ADD: %v", err)
	}
	if ids, _ := loader.List(w.agent.Loader); len(ids) != 0 {
		t.Fatalf("an unmeshed pod was attached: %v", ids)
	}
}

// Without the agent, a meshed pod's creation fails, unless failOpen.
func TestCNIFailsClosed(t *testing.T) {
	p := meshedPod(newUID())
	w := newCNIWorld(t, p)
	missing := filepath.Join(t.TempDir(), "nobody.sock")
	_, err := w.cni(t, w.conflist(t, missing, false), "ADD", p, podNetns(t))
	if err == nil || !strings.Contains(err.Error(), "not captured") {
		t.Fatalf("ADD without an agent must fail closed, got %v", err)
	}
	if _, err := w.cni(t, w.conflist(t, missing, true), "ADD", p, podNetns(t)); err != nil {
		t.Fatalf("with failOpen ADD must succeed: %v", err)
	}
	// Excluded namespaces (kube-system) start without the agent, fail-closed or not.
	system := meshedPod(newUID())
	system.Namespace = "kube-system"
	if _, err := w.cni(t, w.conflist(t, missing, false), "ADD", system, podNetns(t)); err != nil {
		t.Fatalf("a kube-system pod must start without the agent: %v", err)
	}
}

func addrOf(res *types100.Result) netip.Addr {
	a, _ := netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
	return a
}

// Reconcile attaches selected pods that have no capture (created while the agent was down),
// refreshes every pod when the agent restarts (the pod's current policy and the new
// process's programs, swapped without a gap), and removes pins of deleted pods.
func TestReconcile(t *testing.T) {
	meshed, plain := meshedPod(newUID()), meshedPod(newUID())
	plain.Annotations = nil
	w := newCNIWorld(t, meshed, plain)
	ctx := context.Background()

	// Both pods "run": a process in each pod cgroup, in a netns of their own.
	pods := []*testpod.Pod{runningPod(t, w, meshed), runningPod(t, w, plain)}
	port80, port81 := netip.AddrPortFrom(w.net.Addrs[0], 80), netip.AddrPortFrom(w.net.Addrs[0], 81)
	w.net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	w.net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 81))
	landed := func(i int) string { return landedAt(t, pods[i], port80) }
	if landed(0) != "remote" {
		t.Fatal("nothing is attached yet, the meshed pod must not be captured")
	}

	if err := w.agent.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if landed(0) != "proxy" || landed(1) != "remote" {
		t.Fatal("after reconcile the meshed pod must be captured and the plain one not")
	}
	var metrics strings.Builder
	w.agent.WriteMetrics(&metrics)
	for _, want := range []string{
		"divert_pods_attached 1",
		fmt.Sprintf(`divert_verdicts_total{pod_uid=%q,namespace="shop",pod=%q,reason="included-cidr"} 1`, meshed.UID, meshed.Name),
		fmt.Sprintf(`divert_pod_healthy{pod_uid=%q,namespace="shop",pod=%q,health=`, meshed.UID, meshed.Name),
	} {
		if !strings.Contains(metrics.String(), want) {
			t.Errorf("metrics lack %q:\n%s", want, metrics.String())
		}
	}
	if got := landedAt(t, pods[0], port81); got != "remote" {
		t.Fatalf("excludeOutboundPorts=81: a dial to port 81 landed at %s", got)
	}
	before, err := loader.Status(string(meshed.UID), w.agent.Loader)
	if err != nil {
		t.Fatal(err)
	}

	// While the agent is down the pod's policy changes (81 no longer excluded, 80 is). A
	// restarted agent refreshes every pin: the kernel holds the new policy in the same links,
	// still running the node's programs of this build (pinned: nothing loaded again; an
	// upgrade's new build would be swapped in, loader's TestReattachSwapsOnlyOtherPrograms).
	meshed.Annotations["traffic.sidecar.istio.io/excludeOutboundPorts"] = "80"
	if _, err := w.agent.Client.CoreV1().Pods(meshed.Namespace).Update(ctx, meshed, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	restartAgent(t, w)
	after, err := loader.Status(string(meshed.UID), w.agent.Loader)
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Policy.OutboundExcludePorts; len(got) != 1 || got[0] != 80 {
		t.Errorf("after the restart the kernel holds excluded outbound ports %v, want the pod's new [80]", got)
	}
	if len(after.Programs) != len(before.Programs) || len(before.Programs) == 0 {
		t.Fatalf("programs before the restart %+v, after %+v", before.Programs, after.Programs)
	}
	for i := range before.Programs {
		b, a := before.Programs[i], after.Programs[i]
		if b.LinkID != a.LinkID {
			t.Errorf("%s: link replaced on agent restart (%d -> %d): capture had a gap", b.Name, b.LinkID, a.LinkID)
		}
		if b.ProgramID != a.ProgramID {
			t.Errorf("%s: program %d replaced by %d over a restart of the same build: the node's programs were loaded again", b.Name, b.ProgramID, a.ProgramID)
		}
	}
	if got := landedAt(t, pods[0], port81); got != "proxy" {
		t.Fatalf("after the restart a dial to port 81 landed at %s: capture lost, or the old policy still excludes it", got)
	}
	if landed(0) != "remote" {
		t.Fatal("after the restart port 80 must pass: the pod's new policy excludes it")
	}
	restarted := &node.Agent{Client: w.agent.Client, NodeName: "node-1", CgroupRoot: w.cgroups, Loader: w.agent.Loader, Defaults: policy.Default()}

	// Fallback markers (an init container's iptables fallback) live as long as their pod.
	for _, id := range []string{string(plain.UID), "0b1c-gone"} {
		if err := loader.RecordFallback(id, "this kernel lacks program type SkLookup", w.agent.Loader); err != nil {
			t.Fatal(err)
		}
	}
	if err := restarted.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if f, _ := loader.Fallbacks(w.agent.Loader); len(f) != 1 || f[string(plain.UID)] == "" {
		t.Fatalf("after reconcile, want only the running pod's fallback marker, got %v", f)
	}
	if err := loader.ClearFallback(string(plain.UID), w.agent.Loader); err != nil {
		t.Fatal(err)
	}

	// The same under a pod id of istio-init's choosing (--pod-id), which is no pod's UID:
	// the agent cannot tell its pod from the API, and must not take its capture away while
	// its links are live (it did: the pod's traffic escaped until the next reconcile).
	if err := loader.Attach(ctx, loader.Pod{ID: "plain-init", Cgroup: pods[1].CgroupPath, NetNS: pods[1].NetNSPath}, ptr(policy.Default()), w.agent.Loader); err != nil {
		t.Fatal(err)
	}
	if err := restarted.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if landed(1) != "proxy" {
		t.Fatal("reconcile removed the capture of a running pod attached under a pod id that is not its UID")
	}
	if err := loader.Detach("plain-init", w.agent.Loader); err != nil {
		t.Fatal(err)
	}

	// The unselected pod gets pins from someone else (istio-init in the pod, during a
	// migration to node mode): reconcile must leave its capture alone while it runs.
	if err := loader.Attach(ctx, loader.Pod{ID: string(plain.UID), Cgroup: pods[1].CgroupPath, NetNS: pods[1].NetNSPath}, ptr(policy.Default()), w.agent.Loader); err != nil {
		t.Fatal(err)
	}
	if err := restarted.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if landed(1) != "proxy" {
		t.Fatal("reconcile removed the capture of a running pod it did not select (attached by istio-init)")
	}
	if err := w.agent.Client.CoreV1().Pods(plain.Namespace).Delete(ctx, plain.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// The pods are deleted: their pins go.
	if err := w.agent.Client.CoreV1().Pods(meshed.Namespace).Delete(ctx, meshed.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := restarted.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if ids, _ := loader.List(w.agent.Loader); len(ids) != 0 {
		t.Fatalf("pins left for deleted pods: %v", ids)
	}
	if landedAt(t, pods[0], port81) != "remote" || landed(1) != "remote" {
		t.Fatal("a deleted pod's capture must be gone")
	}
}

// Completed pods (Succeeded, Failed) are not live: reconcile removes the pins of one that
// was captured while it ran, and never captures one, even while a process of it is still
// in its cgroup (a sandbox not yet torn down), with or without refresh.
func TestReconcileCompletedPods(t *testing.T) {
	done, failed := meshedPod(newUID()), meshedPod(newUID())
	failed.Status.Phase = corev1.PodFailed
	w := newCNIWorld(t, done, failed)
	ctx := context.Background()
	pods := []*testpod.Pod{runningPod(t, w, done), runningPod(t, w, failed)}
	dst := netip.AddrPortFrom(w.net.Addrs[0], 80)
	w.net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))

	if err := w.agent.Reconcile(ctx, false); err != nil {
		t.Fatal(err)
	}
	if ids, _ := loader.List(w.agent.Loader); len(ids) != 1 || ids[0] != string(done.UID) {
		t.Fatalf("attached %v, want only the running pod %s", ids, done.UID)
	}
	if landedAt(t, pods[0], dst) != "proxy" {
		t.Fatal("the running pod must be captured")
	}

	done.Status.Phase = corev1.PodSucceeded
	if _, err := w.agent.Client.CoreV1().Pods(done.Namespace).UpdateStatus(ctx, done, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, refresh := range []bool{false, true} {
		if err := w.agent.Reconcile(ctx, refresh); err != nil {
			t.Fatal(err)
		}
		if ids, _ := loader.List(w.agent.Loader); len(ids) != 0 {
			t.Fatalf("reconcile (refresh %v) left pins of completed pods: %v", refresh, ids)
		}
		for i, p := range pods {
			if got := landedAt(t, p, dst); got != "remote" {
				t.Errorf("reconcile (refresh %v): completed pod %d's dial landed at %s", refresh, i, got)
			}
		}
	}
}

// The agent's excluded namespaces are never captured, meshed or not: not by reconcile
// (with or without refresh), not by a CNI ADD that reaches the agent anyway.
func TestExcludedNamespaceNotCaptured(t *testing.T) {
	system := meshedPod(newUID())
	system.Namespace = "kube-system"
	w := newCNIWorld(t, system)
	ctx := context.Background()
	agent := &node.Agent{Client: w.agent.Client, NodeName: "node-1", CgroupRoot: w.cgroups, Loader: w.agent.Loader,
		Defaults: policy.Default(), ExcludeNamespaces: []string{"kube-public", "kube-system"}}
	pod := runningPod(t, w, system)
	dst := netip.AddrPortFrom(w.net.Addrs[0], 80)
	w.net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	check := func(step string) {
		t.Helper()
		if ids, _ := loader.List(w.agent.Loader); len(ids) != 0 {
			t.Errorf("%s: pins for a pod in an excluded namespace: %v", step, ids)
		}
		if got := landedAt(t, pod, dst); got != "remote" {
			t.Errorf("%s: the excluded pod's dial landed at %s, want the remote directly", step, got)
		}
	}
	for _, refresh := range []bool{false, true} {
		if err := agent.Reconcile(ctx, refresh); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("reconcile (refresh %v)", refresh))
	}
	res, err := agent.Add(ctx, node.Request{Command: "ADD", Netns: pod.NetNSPath, PodNamespace: system.Namespace, PodName: system.Name, PodUID: string(system.UID)})
	if err != nil || res.Captured {
		t.Errorf("ADD for a pod in an excluded namespace: %+v, %v", res, err)
	}
	check("ADD")
}

func TestChainConflist(t *testing.T) {
	dir := t.TempDir()
	orig := `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap"}]}`
	if err := os.WriteFile(filepath.Join(dir, "10-bridge.conflist"), []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "99-other.conflist"), []byte(orig), 0o644)
	active, err := node.ActiveConflist(dir)
	if err != nil || filepath.Base(active) != "10-bridge.conflist" {
		t.Fatalf("active conflist = %q, %v", active, err)
	}
	entry := func() map[string]any { return map[string]any{"socket": "/run/divert.sock"} }
	if changed, err := node.Chain(active, entry()); err != nil || !changed {
		t.Fatalf("first chain: changed=%v err=%v", changed, err)
	}
	if changed, err := node.Chain(active, entry()); err != nil || changed {
		t.Fatalf("chaining again must change nothing: changed=%v err=%v", changed, err)
	}
	list, err := libcni.ConfListFromFile(active)
	if err != nil || len(list.Plugins) != 3 || list.Plugins[2].Network.Type != node.PluginType || list.Plugins[0].Network.Type != "bridge" {
		t.Fatalf("chained conflist: %+v %v", list, err)
	}
	if changed, err := node.Unchain(active); err != nil || !changed {
		t.Fatalf("unchain: %v %v", changed, err)
	}
	if list, _ := libcni.ConfListFromFile(active); len(list.Plugins) != 2 {
		t.Fatalf("unchain left %d plugins", len(list.Plugins))
	}
	if _, err := node.ActiveConflist(t.TempDir()); err == nil {
		t.Fatal("no conflist must be an error")
	}
}

func ptr[T any](v T) *T { return &v }

// The agent decides a pod's families as istio-cni does: IPv6 is captured too for an
// IPv6-only pod, and for a dual-stack one only with ISTIO_DUAL_STACK in the istio-proxy
// container (or the pod's proxyMetadata); a dual-stack pod without it is captured IPv4
// only, as istio's rules do. The addresses come from the CNI result at ADD (the API does
// not have them yet) and from the pod's status on reconcile.
func TestAgentDecidesIPv6(t *testing.T) {
	dual := func(p *corev1.Pod) *corev1.Pod {
		p.Spec.Containers = []corev1.Container{{Name: "istio-proxy", Env: []corev1.EnvVar{{Name: node.DualStackEnv, Value: "true"}}}}
		return p
	}
	reconciled := meshedPod(newUID())
	reconciled.Status.PodIPs = []corev1.PodIP{{IP: "198.18.0.9"}, {IP: "fd00:10:244::9"}}
	for _, c := range []struct {
		name string
		pod  *corev1.Pod
		ips  []string
		ipv6 bool
	}{
		{"dual-stack", meshedPod(newUID()), []string{"198.18.0.5", "fd00:10:244::5"}, false},
		{"dual-stack, IPv6 first", meshedPod(newUID()), []string{"fd00:10:244::5", "198.18.0.5"}, false},
		{"dual-stack with ISTIO_DUAL_STACK", dual(meshedPod(newUID())), []string{"198.18.0.5", "fd00:10:244::5"}, true},
		{"IPv6 only", meshedPod(newUID()), []string{"fd00:10:244::5"}, true},
		{"dual-stack from the API, ISTIO_DUAL_STACK", dual(reconciled), []string{"198.18.0.9"}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			opts := divertest.BPFFS(t)
			a := &node.Agent{Client: fake.NewClientset(c.pod), NodeName: "node-1", CgroupRoot: cgroupRoot(t), Loader: opts, Defaults: policy.Default()}
			pod := testpod.NewStack(t, testpod.DualStack)
			req := node.Request{Command: "ADD", Netns: pod.NetNSPath, PodNamespace: c.pod.Namespace, PodName: c.pod.Name, PodUID: string(c.pod.UID), IPs: c.ips}
			if _, err := a.Add(context.Background(), req); err != nil {
				t.Fatalf("ADD with IPs %v (status %v): %v", c.ips, c.pod.Status.PodIPs, err)
			}
			t.Cleanup(func() { _ = loader.Detach(string(c.pod.UID), opts) })
			st, err := loader.Status(string(c.pod.UID), opts)
			if err != nil {
				t.Fatal(err)
			}
			if st.Policy.IPv6 != c.ipv6 {
				t.Errorf("IPv6 captured: %v, want %v", st.Policy.IPv6, c.ipv6)
			}
		})
	}
}

// A pod whose init container fell back to iptables is exported, with the reason, from
// the marker it left: found without that container's log.
func TestMetricsExportFallback(t *testing.T) {
	a := &node.Agent{Loader: divertest.BPFFS(t)}
	if err := loader.RecordFallback("0b1c-2d", "this kernel lacks program type SkLookup: not supported", a.Loader); err != nil {
		t.Fatal(err)
	}
	var metrics strings.Builder
	a.WriteMetrics(&metrics)
	want := `divert_iptables_fallback{pod_uid="0b1c-2d",namespace="",pod="",reason="this kernel lacks program type SkLookup: not supported"} 1`
	if !strings.Contains(metrics.String(), want) {
		t.Errorf("metrics lack %q:\n%s", want, metrics.String())
	}
}

// restartedAgentEnv names the plan file that makes the test binary a restarted agent.
const restartedAgentEnv = "DIVERT_NODE_TEST_RESTARTED_AGENT"

// agentPlan is what a restarted agent process gets: the node's pods as the API serves
// them now, and where cgroups and pins are.
type agentPlan struct {
	NodeName, CgroupRoot, BPFFS string
	Pods                        []corev1.Pod
}

// restartAgent runs the agent's start (Reconcile with refresh) in a new process, as a
// restarted or upgraded DaemonSet pod does: a process that has loaded no programs yet, so
// the refresh swaps in freshly loaded ones. It sees the pods w's clientset holds now.
func restartAgent(t *testing.T, w *cniWorld) {
	t.Helper()
	list, err := w.agent.Client.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(agentPlan{NodeName: w.agent.NodeName, CgroupRoot: w.cgroups, BPFFS: w.agent.Loader.BPFFS, Pods: list.Items})
	if err != nil {
		t.Fatal(err)
	}
	plan := filepath.Join(t.TempDir(), "plan.json")
	if err := os.WriteFile(plan, b, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), restartedAgentEnv+"="+plan)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("restarted agent: %v\n%s", err, out)
	}
}

func runRestartedAgent(planFile string) int {
	var plan agentPlan
	b, err := os.ReadFile(planFile)
	if err == nil {
		err = json.Unmarshal(b, &plan)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var objs []runtime.Object
	for i := range plan.Pods {
		objs = append(objs, &plan.Pods[i])
	}
	a := &node.Agent{Client: fake.NewClientset(objs...), NodeName: plan.NodeName, CgroupRoot: plan.CgroupRoot,
		Loader: loader.Options{BPFFS: plan.BPFFS}, Defaults: policy.Default()}
	if err := a.Reconcile(context.Background(), true); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// runningPod gives p a process (a proxy on 15001) in its pod cgroup, in a netns of its
// own on w's network, as a pod whose sandbox runs.
func runningPod(t *testing.T, w *cniWorld, p *corev1.Pod) *testpod.Pod {
	t.Helper()
	cg := filepath.Join(w.cgroups, node.ExpectedPodCgroup(p))
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	tp := w.net.AddPod(t)
	tp.CgroupPath = cg
	tp.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
	return tp
}

// landedAt dials dst from pod as the app and returns who answered.
func landedAt(t *testing.T, pod *testpod.Pod, dst netip.AddrPort) string {
	t.Helper()
	r := pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: dst})[0]
	if len(r.Hops) != 1 {
		t.Fatalf("dial %s from %s: %+v", dst, pod.Name, r)
	}
	return r.Hops[0].Who
}

// A pod asking for what eBPF cannot do (here: a Multus interface left alone) does not
// start: the CNI error (the kubelet's event) names the annotation, and nothing is pinned.
func TestAgentRefusesExcludeInterfaces(t *testing.T) {
	p := meshedPod(newUID())
	p.Annotations["traffic.sidecar.istio.io/excludeInterfaces"] = "net1"
	opts := divertest.BPFFS(t)
	a := &node.Agent{Client: fake.NewClientset(p), NodeName: "node-1", CgroupRoot: t.TempDir(), Loader: opts, Defaults: policy.Default()}
	_, err := a.Add(context.Background(), node.Request{Command: "ADD", Netns: "/proc/self/ns/net",
		PodNamespace: p.Namespace, PodName: p.Name, PodUID: string(p.UID), IPs: []string{"198.18.0.5"}})
	if err == nil || !strings.Contains(err.Error(), "traffic.sidecar.istio.io/excludeInterfaces") || !strings.Contains(err.Error(), "no iptables fallback") {
		t.Fatalf("want the pod refused naming the annotation, got %v", err)
	}
	if ids, err := loader.List(opts); err != nil || len(ids) != 0 {
		t.Fatalf("a refused pod left pins: %v %v", ids, err)
	}
}
