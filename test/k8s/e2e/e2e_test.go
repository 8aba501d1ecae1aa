// Package e2e proves divert in a real single-node Kubernetes cluster: pod cgroups made by
// the kubelet and runc, a netns made by CNI, an init container that exits before the app
// starts. TestMain builds everything, brings the cluster up (package cluster), starts the
// scenario pods, runs the tests, prints a table scenario -> result and tears the cluster
// down. Run it as root: make e2e-k8s.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/meshdivert/divert/test/k8s/e2e/cluster"
)

var (
	flagState = flag.String("k8s.state", "/var/lib/divert-k8s-e2e", "the one directory for all cluster state (wiped at start, logs kept after)")
	flagCache = flag.String("k8s.cache", defaultCache(), "where built Kubernetes binaries are kept between runs")
	flagKeep  = flag.Bool("k8s.keep", false, "leave the cluster running after the tests (the next run tears it down first); kubectl --kubeconfig <state>/admin.kubeconfig")
	flagBreak = flag.Bool("k8s.break", false, "deliberately break the main eBPF pod's capture (wrong proxy port): the suite must fail")
)

func defaultCache() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "divert-k8s")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "divert-k8s")
}

// env is what the tests share: the cluster, its binaries and the scenario pods' addresses.
type env struct {
	c    *cluster.Cluster
	bins cluster.Binaries
	ips  map[string]string // pod name -> pod IP
	uids map[string]string // pod name -> pod UID (the eBPF pin directory's name)
}

var (
	suite *env
	ctx   context.Context
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(run(m))
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "k8s-e2e: "+format+"\n", args...)
}

func run(m *testing.M) (code int) {
	if os.Geteuid() != 0 {
		logf("must run as root: it starts a kubelet, containerd and privileged pods")
		return 1
	}
	var stop context.CancelFunc
	ctx, stop = signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	times := &timings{}

	repo, err := filepath.Abs("../../..")
	if err != nil {
		logf("%v", err)
		return 1
	}
	t0 := time.Now()
	bins, bres, err := cluster.Build(ctx, repo, *flagCache, filepath.Join(*flagCache, "repo-bin"), logf)
	if err != nil {
		logf("build: %v", err)
		return 1
	}
	times.add("build Kubernetes", bres.Kube, map[bool]string{true: "cached", false: "go build"}[bres.KubeCached])
	times.add("build CoreDNS", bres.CoreDNS, map[bool]string{true: "cached", false: "go build"}[bres.CoreDNSCached])
	times.add("build divert + testapp", bres.Repo, "")
	imgs, err := images(bins)
	if err != nil {
		logf("images: %v", err)
		return 1
	}

	t := time.Now()
	c, err := cluster.Up(ctx, cluster.Config{State: *flagState, Logf: logf}, bins)
	if err != nil {
		logf("cluster up: %v", err)
		return 1
	}
	times.add("cluster up (node Ready)", time.Since(t), "")
	defer func() {
		if *flagKeep {
			logf("cluster left running (-k8s.keep): kubectl --kubeconfig %s; the next run tears it down", c.Kubeconfig)
			return
		}
		t := time.Now()
		if err := c.Down(); err != nil {
			logf("teardown: %v", err)
			code = 1
		}
		times.add("teardown", time.Since(t), "")
		times.add("total", time.Since(t0), "")
		times.print()
	}()

	t = time.Now()
	if err := c.ImportImages(imgs); err != nil {
		logf("%v", err)
		return 1
	}
	times.add("images build + import", time.Since(t), "")

	suite = &env{c: c, bins: bins, ips: map[string]string{}, uids: map[string]string{}}
	t = time.Now()
	if err := c.InstallDNS(ctx); err != nil {
		logf("%v", err)
		return 1
	}
	if err := suite.deploy(); err != nil {
		logf("deploying the scenario pods: %v", err)
		return 1
	}
	if err := c.WaitDNS(ctx); err != nil {
		logf("%v", err)
		return 1
	}
	times.add("scenario pods and CoreDNS Ready", time.Since(t), "")

	t = time.Now()
	code = m.Run()
	times.add("scenarios", time.Since(t), "")
	printTable()
	return code
}

// images: the pause image and the test app share the static testapp binary. The divert
// image is laid out as the Dockerfile's final stage: iptables (Debian 12's, copied from this
// Debian 12 host instead of apt-get install in debian:12-slim), /usr/local/bin/divert with
// divert-node (the DaemonSet's agent), divert-cni (the agent installs it on the host) and an
// istio-iptables link beside it, and
// divert as the entrypoint, so pods pass Istio's
// "istio-iptables ..." as args exactly as the injector does.
func images(bins cluster.Binaries) ([]cluster.Image, error) {
	ipt, err := cluster.IptablesLayer()
	if err != nil {
		return nil, err
	}
	return []cluster.Image{
		{Ref: cluster.PauseImage, Layers: []cluster.FileSet{{{Path: "/pause", Src: bins.Testapp}}}, Entrypoint: []string{"/pause", "pause"}},
		{Ref: testappRef, Layers: []cluster.FileSet{{{Path: "/testapp", Src: bins.Testapp}}}, Entrypoint: []string{"/testapp"}},
		{Ref: cluster.CoreDNSImage, Layers: []cluster.FileSet{{{Path: "/coredns", Src: bins.CoreDNS}}}, Entrypoint: []string{"/coredns"}},
		{Ref: divertRef, Layers: []cluster.FileSet{ipt, {
			{Path: "/usr/local/bin/divert", Src: bins.Divert},
			{Path: "/usr/local/bin/divert-cni", Src: bins.DivertCNI},
			{Path: "/usr/local/bin/divert-node", Src: bins.DivertNode},
			{Path: "/usr/local/bin/istio-iptables", Link: "divert"},
		}}, Entrypoint: []string{"/usr/local/bin/divert"}},
	}, nil
}

// Pod names. mesh-a (Istio's template), mesh-b (host cgroup at /sys/fs/cgroup): eBPF;
// mesh-ipt: the iptables backend; mesh-fallback: --mode auto falling back to iptables;
// mesh-broken: eBPF with a proxy port nothing listens on (the negative row). mesh-a and
// mesh-ipt have Istio's DNS proxying on, mesh-b not. native-init: Istio's native sidecar
// after divert as istio-init; dup-init: a second divert init container with another pod
// id, which must be refused (the pod fails).
const (
	plainName  = "plain"
	meshA      = "mesh-a"
	meshB      = "mesh-b"
	meshIpt    = "mesh-ipt"
	meshAuto   = "mesh-fallback"
	meshBroken = "mesh-broken"
	nativeInit = "native-init"
	dupInit    = "dup-init"
	wrongPort  = "15099"
)

var meshed = []string{meshA, meshB, meshIpt, meshAuto, meshBroken}

// deploy starts every scenario pod at once (they come up in parallel in a few seconds)
// and waits until each listener in them is up: a pod is Ready when its containers started,
// which is before the test app has bound its sockets, so the tests wait for the "ready"
// line testpod's helpers print after listening.
func (e *env) deploy() error {
	if _, err := e.c.Kubectl(ctx, "create", "namespace", namespace); err != nil {
		return err
	}
	if err := e.c.WaitFor(ctx, "service account "+namespace+"/default", time.Minute, func() error {
		_, err := e.c.Kubectl(ctx, "get", "serviceaccount", "default", "-n", namespace)
		return err
	}); err != nil {
		return err
	}
	a := meshedPod(meshA, ebpf, istioTemplate, outboundPrt, e.c.BPFFS)
	if *flagBreak {
		// Without the validation container, which would keep the pod from starting: the
		// point is to see the traffic checks fail.
		a = meshedPod(meshA, ebpf, noValidate, wrongPort, e.c.BPFFS)
		logf("-k8s.break: %s's init container attaches with -p %s; the suite must fail", meshA, wrongPort)
	}
	// Services first: kube-proxy has them before any pod dials one (native-init's app-init
	// does while the pod starts).
	var svcs []obj
	for name, ip := range serviceIPs {
		svcs = append(svcs, service(name, ip))
	}
	if _, err := e.c.KubectlIn(ctx, list(svcs...), "apply", "-f", "-"); err != nil {
		return err
	}
	if err := e.c.WaitFor(ctx, "kube-proxy serving the test Services", 30*time.Second, func() error {
		var ips []string
		for _, ip := range serviceIPs {
			ips = append(ips, ip)
		}
		return e.c.ProxyServes(ips...)
	}); err != nil {
		return err
	}
	objs := []obj{}
	objs = append(objs,
		plainPod(plainName),
		withDNSCapture(a),
		meshedPod(meshB, ebpf, hostCgroupAtSys, outboundPrt, e.c.BPFFS),
		withDNSCapture(meshedPod(meshIpt, iptables, istioTemplate, outboundPrt, e.c.BPFFS)),
		meshedPod(meshAuto, fallback, istioTemplate, outboundPrt, e.c.BPFFS),
		meshedPod(meshBroken, ebpf, noValidate, wrongPort, e.c.BPFFS),
		dupInitPod(dupInit, e.c.BPFFS),
	)
	if _, err := e.c.KubectlIn(ctx, list(objs...), "apply", "-f", "-"); err != nil {
		return err
	}
	// native-init's app-init dials plain's Service while the pod starts: plain must be
	// behind it by then.
	if err := e.waitEndpoint(plainName); err != nil {
		return err
	}
	if _, err := e.c.KubectlIn(ctx, list(nativeInitPod(nativeInit, e.c.BPFFS)), "apply", "-f", "-"); err != nil {
		return err
	}
	// dup-init never gets Ready: its second init container must fail (TestSecondPodID).
	wait := append([]string{"wait", "-n", namespace, "--for=condition=Ready", "pod", plainName, nativeInit, "--timeout=120s"}, meshed...)
	if _, err := e.c.Kubectl(ctx, wait...); err != nil {
		return fmt.Errorf("%w\n%s", err, e.describe())
	}
	out, err := e.c.Kubectl(ctx, "get", "pods", "-n", namespace, "-o", `jsonpath={range .items[*]}{.metadata.name}={.status.podIP}={.metadata.uid}{"\n"}{end}`)
	if err != nil {
		return err
	}
	for _, l := range strings.Fields(out) {
		f := strings.Split(l, "=")
		e.ips[f[0]], e.uids[f[0]] = f[1], f[2]
	}
	ready := map[string][]string{plainName: {"app"}, nativeInit: {"istio-proxy", "app"}}
	for _, p := range meshed {
		ready[p] = []string{"proxy", "app"}
	}
	for p, cs := range ready {
		for _, ctr := range cs {
			if err := waitListening(p, ctr); err != nil {
				return err
			}
		}
	}
	return nil
}

// waitEndpoint waits until pod is Ready and kube-proxy has its address as an endpoint.
func (e *env) waitEndpoint(pod string) error {
	if _, err := e.c.Kubectl(ctx, "wait", "-n", namespace, "--for=condition=Ready", "pod", pod, "--timeout=60s"); err != nil {
		return err
	}
	ip, err := e.c.Kubectl(ctx, "get", "pod", "-n", namespace, pod, "-o", "jsonpath={.status.podIP}")
	if err != nil {
		return err
	}
	return e.c.WaitFor(ctx, "kube-proxy forwarding to "+pod, 30*time.Second, func() error { return e.c.ProxyServes(ip) })
}

// describe is what a failed wait shows: pod status, every container's output (the init
// containers' first) and the namespace's latest events.
func (e *env) describe() string {
	if ctx.Err() != nil {
		return "(interrupted)"
	}
	var b strings.Builder
	out, _ := e.c.Kubectl(ctx, "get", "pods", "-n", namespace, "-o", "wide")
	b.WriteString(out)
	for _, p := range append([]string{nativeInit}, meshed...) {
		logs, err := e.c.Kubectl(ctx, "logs", "-n", namespace, p, "--all-containers", "--prefix")
		fmt.Fprintf(&b, "--- %s:\n%s%s\n", p, logs, errOrNil(err))
	}
	ev, _ := e.c.Kubectl(ctx, "get", "events", "-n", namespace, "--sort-by=.lastTimestamp")
	b.WriteString(tailLines(ev, 30))
	return b.String()
}

func errOrNil(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func tailLines(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n") + "\n"
}

// --- the result table -------------------------------------------------------------------

type row struct {
	name, result, detail string
}

var (
	rowsMu sync.Mutex
	rows   []*row
)

// scenario registers a table row for the running test; its result is the test's outcome,
// its detail whatever the test notes (who answered, what the proxy saw).
func scenario(t *testing.T) *row {
	r := &row{name: t.Name()}
	rowsMu.Lock()
	rows = append(rows, r)
	rowsMu.Unlock()
	t.Cleanup(func() {
		switch {
		case t.Skipped():
			r.result = "SKIP"
		case t.Failed():
			r.result = "FAIL"
		default:
			r.result = "ok"
		}
	})
	return r
}

// note sets the row's detail, on one line and at most 160 characters (the table is one
// line per row; the test's own output has everything).
func (r *row) note(format string, args ...any) {
	r.detail = strings.Join(strings.Fields(fmt.Sprintf(format, args...)), " ")
	if len(r.detail) > 160 {
		r.detail = r.detail[:157] + "..."
	}
}

// fail notes the failure in the row (the table is what a CI log shows first) and stops
// the test.
func (r *row) fail(t *testing.T, format string, args ...any) {
	t.Helper()
	r.note(format, args...)
	t.Fatalf(format, args...)
}

func printTable() {
	rowsMu.Lock()
	defer rowsMu.Unlock()
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\nSCENARIO\tRESULT\tDETAIL")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%s\t%s\n", r.name, r.result, r.detail)
	}
	w.Flush()
}

type timings struct{ rows [][3]string }

func (t *timings) add(what string, d time.Duration, note string) {
	t.rows = append(t.rows, [3]string{what, d.Round(100 * time.Millisecond).String(), note})
}

func (t *timings) print() {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\nSTEP\tTIME\t")
	for _, r := range t.rows {
		fmt.Fprintf(w, "%s\t%s\t%s\n", r[0], r[1], r[2])
	}
	w.Flush()
}
