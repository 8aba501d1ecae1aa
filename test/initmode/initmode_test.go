// Package initmode tests divert as Istio's istio-init container: the binary built exactly
// as the Dockerfile builds it runs as a pod's init container would, inside the pod's network
// namespace and in a child cgroup of the pod's cgroup (laid out as kubelet does), with the
// injector's istio-iptables command line; after it exits, the pod must be captured as the
// parity suite expects.
package initmode

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/image"
	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested()
	code := m.Run()
	image.Cleanup()
	os.Exit(code)
}

const (
	proxyUID = divertest.ProxyUID
	appUID   = divertest.AppUID
)

var anyAddr = netip.IPv4Unspecified()

// injectorArgs is the istio-init command line of Istio's sidecar injector (after
// "istio-iptables").
var injectorArgs = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// layout is how kubelet names a pod's cgroup and its runtime a container's.
type layout struct {
	name      string
	pod       func(uid string) string // relative path of the pod cgroup
	container func(id string) string  // a container's directory name
	initName  string                  // if set, init containers' directory name
}

var (
	cgroupfsLayout = layout{"cgroupfs",
		func(uid string) string { return "kubepods/besteffort/pod" + uid },
		func(id string) string { return id }, ""}
	systemdLayout = layout{"systemd",
		func(uid string) string {
			return "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"
		},
		func(id string) string { return "cri-containerd-" + id + ".scope" }, ""}
)

// k8sPod is a test pod whose cgroup holds kubelet's layout: the pod's cgroup is
// <test pod cgroup>/<layout.pod(UID)>, and each "container" is a child of it.
type k8sPod struct {
	*testpod.Pod
	UID    string
	Dir    string // the pod's cgroup
	layout layout
}

func newK8sPod(t *testing.T, l layout) *k8sPod {
	t.Helper()
	return newK8sPodStack(t, l, testpod.IPv4Only)
}

// newK8sPodStack is newK8sPod with the address families of s.
func newK8sPodStack(t *testing.T, l layout, s testpod.Stack) *k8sPod {
	t.Helper()
	pod := testpod.NewStack(t, s)
	k := &k8sPod{Pod: pod, UID: newUID(t), layout: l}
	k.Dir = mkdirs(t, pod.CgroupPath, l.pod(k.UID))
	return k
}

// view is the pod as seen at its own cgroup: for counting programs attached there.
func (k *k8sPod) view() *testpod.Pod {
	v := *k.Pod
	v.CgroupPath = k.Dir
	return &v
}

// container makes a container cgroup in the pod and returns the pod with that cgroup, so
// processes started through it run in that container.
func (k *k8sPod) container(t *testing.T) *testpod.Pod {
	t.Helper()
	return k.containerNamed(t, k.layout.container(randHex(t, 32)))
}

func (k *k8sPod) containerNamed(t *testing.T, name string) *testpod.Pod {
	t.Helper()
	c := *k.Pod
	c.CgroupPath = mkdirs(t, k.Dir, name)
	return &c
}

// mkdirs creates rel below base one level at a time, removing them again (innermost first)
// at the end of the test; processes started later are stopped before that.
func mkdirs(t *testing.T, base, rel string) string {
	t.Helper()
	dir := base
	for _, part := range strings.Split(rel, "/") {
		dir = filepath.Join(dir, part)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		d := dir
		t.Cleanup(func() { rmdirCgroup(t, d) })
	}
	return dir
}

// rmdirCgroup removes a cgroup, retrying while the kernel still lets go of exited
// processes; a cgroup already gone is fine.
func rmdirCgroup(t *testing.T, dir string) {
	var err error
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if err = unix.Rmdir(dir); err != unix.EBUSY || time.Now().After(deadline) {
			break
		}
	}
	if err != nil && err != unix.ENOENT {
		t.Errorf("rmdir %s: %v", dir, err)
	}
}

func newUID(t *testing.T) string {
	h := randHex(t, 32)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

func randHex(t *testing.T, n int) string {
	b := make([]byte, n/2)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// result is how a divert run ended.
type result struct {
	stdout, stderr string
	code           int
}

// run runs the divert binary at path with args as uid/gid in container c, with the given
// environment variables (NAME=value, no quoting needed) added. It returns however the run
// ends: a shell around it prints the exit code, so a failure is data, not a test failure.
func run(t *testing.T, c *testpod.Pod, uid, gid uint32, env []string, path string, args ...string) result {
	t.Helper()
	return runWrapped(t, c, uid, gid, nil, strings.Join(env, " ")+` "$0" "$@"`, path, args...)
}

// runWrapped is run with a command prefix (like unshare) and a shell script whose "$0" is
// the divert binary and "$@" its arguments.
func runWrapped(t *testing.T, c *testpod.Pod, uid, gid uint32, prefix []string, script, path string, args ...string) result {
	t.Helper()
	// testpod gives processes an empty environment; the shell's tools need a PATH.
	script = "PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH; " + script + `; echo "exit=$?"`
	argv := append(append(append([]string{}, prefix...), "/bin/sh", "-c", script, path), args...)
	pr := c.Start(t, testpod.ProcSpec{UID: uid, GID: gid, Path: argv[0], Args: argv[1:]})
	out := pr.Wait(t, 90*time.Second)
	i := strings.LastIndex(out, "exit=")
	if i < 0 {
		t.Fatalf("no exit status from %v: %q\nstderr: %s", argv, out, pr.Stderr())
	}
	code, err := strconv.Atoi(strings.TrimSpace(out[i+len("exit="):]))
	if err != nil {
		t.Fatalf("exit status %q: %v", out[i:], err)
	}
	return result{stdout: out[:i], stderr: pr.Stderr(), code: code}
}

func (r result) mustSucceed(t *testing.T, what string) {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("%s: exit %d\nstdout: %s\nstderr: %s", what, r.code, r.stdout, r.stderr)
	}
}

// initContainer runs divert in a fresh container cgroup of the pod, as an init container,
// and removes that cgroup once it exited, as the runtime does.
func initContainer(t *testing.T, k *k8sPod, env []string, path string, args ...string) result {
	t.Helper()
	c := k.container(t)
	if k.layout.initName != "" {
		c = k.containerNamed(t, k.layout.initName)
	}
	r := run(t, c, 0, 0, env, path, args...)
	if n := cgroupPrograms(t, c.CgroupPath); n != 0 {
		t.Errorf("%d programs attached to the init container's own cgroup; they belong on the pod's", n)
	}
	rmdirCgroup(t, c.CgroupPath)
	return r
}

// cgroupPrograms counts the programs attached to the cgroup dir itself (not inherited).
func cgroupPrograms(t *testing.T, dir string) int {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for _, at := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			t.Fatalf("query %s programs on %s: %v", at, dir, err)
		}
		n += len(res.Programs)
	}
	return n
}

// probe is one connection and what the model says happens to it.
type probe struct {
	name string
	from string // "app", "proxy" (in the pod) or "remote"
	dst  netip.AddrPort
}

// requireEBPF fails the test unless divert's four programs are on pod's cgroup and netns.
func requireEBPF(t *testing.T, pod *testpod.Pod) {
	t.Helper()
	if n := divertest.AttachedPrograms(t, pod); n != 4 {
		t.Fatalf("%d programs on the pod's cgroup and netns, want 4", n)
	}
}

// requireUncaptured fails the test if the pod has divert's programs, pins or istio's rules.
func requireUncaptured(t *testing.T, k *k8sPod, opts loader.Options) {
	t.Helper()
	divertest.AssertNothingAttached(t, k.view(), opts)
	if rules := istioRules(t, k.NetNSPath); rules != "" {
		t.Errorf("istio's rules in the pod's netns:\n%s", rules)
	}
}

// checkCapture runs a proxy, an app server and a remote server, makes connections that
// exercise capture both ways and the bypasses, and requires for each what policy.Decide (the
// reference model the parity suite holds both backends to) says for cfg: which listener
// accepts, and the original destination the proxy reads.
func checkCapture(t *testing.T, k *k8sPod, cfg *policy.Config) {
	t.Helper()
	proxy := k.container(t)
	proxy.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: proxyUID, GID: proxyUID,
		Listen: []netip.AddrPort{netip.AddrPortFrom(anyAddr, cfg.ProxyPort), netip.AddrPortFrom(anyAddr, cfg.InboundCapturePort)}})
	app := k.container(t)
	app.Server(t, "app", netip.AddrPortFrom(anyAddr, 15021), appUID, appUID)
	k.Net.Server(t, "remote", netip.AddrPortFrom(anyAddr, 80))

	remote := netip.AddrPortFrom(k.Net.Addrs[0], 80)
	probes := []probe{
		{"app to a remote service", "app", remote},
		{"the proxy to a remote service", "proxy", remote},
		{"inbound to the app's port 8080", "remote", netip.AddrPortFrom(k.Addr, 8080)},
		{"inbound to the excluded port 15021", "remote", netip.AddrPortFrom(k.Addr, 15021)},
	}
	for _, p := range probes {
		conn := policy.Conn{Direction: policy.Outbound, UID: appUID, GID: appUID, Dst: p.dst}
		var res testpod.Result
		switch p.from {
		case "app":
			res = app.Dial(t, appUID, appUID, testpod.Target{Dst: p.dst})[0]
		case "proxy":
			conn.UID, conn.GID = proxyUID, proxyUID
			res = proxy.Dial(t, proxyUID, proxyUID, testpod.Target{Dst: p.dst})[0]
		case "remote":
			conn = policy.Conn{Direction: policy.Inbound, Dst: p.dst, DstLocal: true}
			res = k.Net.Dial(t, testpod.Target{Dst: p.dst})[0]
		}
		v := cfg.Decide(conn)
		want := "answered by " + map[netip.AddrPort]string{remote: "remote", netip.AddrPortFrom(k.Addr, 15021): "app"}[p.dst]
		if v.Action != policy.Pass {
			want = fmt.Sprintf("proxy via 0.0.0.0:%d read %s", v.Port, p.dst)
		}
		got := res.Err
		if len(res.Hops) == 1 {
			h := res.Hops[0]
			got = "answered by " + h.Who
			if h.Listener != "" {
				got = fmt.Sprintf("%s via %s read %s", h.Who, h.Listener, h.Orig)
			}
		}
		if got != want {
			t.Errorf("%s (%s): %s; the model says %s (%s)", p.name, p.dst, got, want, v)
		}
	}
}

// istioRules returns the ISTIO_ lines iptables-save (nft and legacy) shows in a netns.
func istioRules(t *testing.T, netns string) string {
	t.Helper()
	return savedRules(t, netns, "iptables")
}

// ip6Rules is istioRules for ip6tables.
func ip6Rules(t *testing.T, netns string) string {
	t.Helper()
	return savedRules(t, netns, "ip6tables")
}

// savedRules returns the ISTIO_ lines that tool's nft and legacy save commands show in netns.
func savedRules(t *testing.T, netns, tool string) string {
	t.Helper()
	var lines []string
	for _, save := range []string{tool + "-nft-save", tool + "-legacy-save"} {
		path, err := exec.LookPath(save)
		if err != nil {
			continue
		}
		out, err := nsexec.CombinedOutput(netns, exec.Command(path))
		if err != nil {
			t.Fatalf("%s: %v\n%s", save, err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "ISTIO_") {
				lines = append(lines, l)
			}
		}
	}
	return strings.Join(lines, "\n")
}

func assertPinned(t *testing.T, opts loader.Options, id string) {
	t.Helper()
	for _, p := range loader.Plan(opts) {
		if _, err := os.Stat(filepath.Join(loader.PinDir(opts, id), p.Pin)); err != nil {
			t.Errorf("pin of %s: %v", p.Name, err)
		}
	}
}

// The Dockerfile's build makes static binaries: the final stage has no Go toolchain or
// C library for divert or divert-node to depend on, and divert-cni runs on the host,
// outside the image.
func TestImageBinaryIsStatic(t *testing.T) {
	divert := image.Divert(t)
	for _, bin := range []string{divert, filepath.Join(filepath.Dir(divert), "divert-cni"), filepath.Join(filepath.Dir(divert), "divert-node")} {
		static, err := image.IsStatic(bin)
		if err != nil || !static {
			t.Errorf("the image's %s must be statically linked (CGO_ENABLED=0): static=%v, %v", filepath.Base(bin), static, err)
		}
	}
}

// The injector's exact command line, invoked as istio-iptables (the image's link), in an
// init container of a pod laid out by kubelet's cgroupfs driver: the pod's cgroup is found,
// captured, and stays captured after the init container is gone.
func TestInjectorCommandLine(t *testing.T) {
	divert := image.Divert(t)
	for _, c := range []struct {
		layout layout
		path   string
		extra  func(t *testing.T) []string
	}{
		{cgroupfsLayout, filepath.Join(filepath.Dir(divert), "istio-iptables"), func(*testing.T) []string { return nil }},
		// The systemd driver's names, through "divert istio-iptables", with the host's
		// cgroup tree given as --cgroup-root (on a hybrid host: the tmpfs above "unified").
		{systemdLayout, divert, func(t *testing.T) []string {
			root := divertest.Cgroup2Mount(t)
			if filepath.Base(root) == "unified" {
				root = filepath.Dir(root)
			}
			return []string{"--cgroup-root", root}
		}},
	} {
		t.Run(c.layout.name, func(t *testing.T) {
			k := newK8sPod(t, c.layout)
			opts := divertest.BPFFS(t)
			args := append(append([]string{}, injectorArgs...), "--bpffs", opts.BPFFS)
			args = append(args, c.extra(t)...)
			if c.path == divert {
				args = append([]string{"istio-iptables"}, args...)
			}
			// The downward API's names, as divert's injector template passes them.
			env := []string{"POD_NAMESPACE=shop", "POD_NAME=web-" + c.layout.name}
			r := initContainer(t, k, env, c.path, args...)
			r.mustSucceed(t, "istio-iptables")
			t.Cleanup(func() { loader.Detach(k.UID, opts) })
			if st, err := loader.Status(k.UID, opts); err != nil || st.Pod != "shop/web-"+c.layout.name {
				t.Errorf("status names the pod %q (%v), want shop/web-%s", st.Pod, err, c.layout.name)
			}
			if !strings.Contains(r.stdout, "attached pod "+k.UID+" with eBPF: cgroup "+k.Dir+" ("+c.layout.name+" layout") {
				t.Errorf("output should name the pod, its cgroup and the layout:\n%s", r.stdout)
			}
			if r.stderr != "" {
				t.Errorf("stderr: %s", r.stderr)
			}
			requireEBPF(t, k.view())
			assertPinned(t, opts, k.UID)
			checkCapture(t, k, divertest.Config(t, injectorArgs...))
		})
	}
}

// The brief's plain layout: the init container's cgroup is a child of a cgroup that is not
// named like a Kubernetes pod; its parent is captured only when asked to by --pod-id.
func TestParentLayoutNeedsPodID(t *testing.T) {
	divert := image.Divert(t)
	pod := testpod.New(t)
	k := &k8sPod{Pod: pod, Dir: pod.CgroupPath, layout: layout{"parent", nil, func(id string) string { return "ctr-" + id[:12] }, "init-ctr"}}
	opts := divertest.BPFFS(t)
	args := append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)

	r := initContainer(t, k, nil, divert, args...)
	if r.code == 0 || !strings.Contains(r.stderr, "--pod-id") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("without --pod-id: want one line naming --pod-id, got exit %d, stderr %q", r.code, r.stderr)
	}
	divertest.AssertNothingAttached(t, pod, opts)

	r = initContainer(t, k, nil, divert, append(args, "--pod-id", pod.Name)...)
	r.mustSucceed(t, "istio-iptables --pod-id")
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	requireEBPF(t, pod)
	checkCapture(t, k, divertest.Config(t, injectorArgs...))
}

// Auto mode on a kernel "without" eBPF (the test hook fails the probe): one line on stderr
// says why, istio's iptables rules go into the pod's netns, and capture behaves the same.
// --run-validation then checks it from inside, as root switching one thread to uid 1337.
func TestAutoFallsBackToIptables(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	args := append([]string{"istio-iptables", "--bpffs", opts.BPFFS, "--run-validation"}, injectorArgs...)
	r := initContainer(t, k, []string{"DIVERT_TEST_FORCE_NO_EBPF=1"}, divert, args...)
	r.mustSucceed(t, "istio-iptables with eBPF turned off")
	if lines := strings.Split(strings.TrimSpace(r.stderr), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "DIVERT_TEST_FORCE_NO_EBPF") || !strings.Contains(lines[0], "using iptables") {
		t.Errorf("want one line on stderr with the reason, got %q", r.stderr)
	}
	if !strings.Contains(r.stdout, "iptables rules applied") || !strings.Contains(r.stdout, "validation passed") {
		t.Errorf("stdout: %s", r.stdout)
	}
	if n := divertest.AttachedPrograms(t, k.view()); n != 0 {
		t.Errorf("%d programs attached after the fallback", n)
	}
	// The node sees the fallback without the init container's logs.
	out, err := exec.Command(divert, "status", "--bpffs", opts.BPFFS).CombinedOutput()
	if want := "pod " + k.UID + ": iptables fallback: turned off by $DIVERT_TEST_FORCE_NO_EBPF=1"; err != nil || !strings.Contains(string(out), want) {
		t.Errorf("divert status should list the fallback (%q): %v\n%s", want, err, out)
	}
	rules := istioRules(t, k.NetNSPath)
	if !strings.Contains(rules, "-A ISTIO_OUTPUT") || !strings.Contains(rules, "-A PREROUTING -p tcp -j ISTIO_INBOUND") {
		t.Fatalf("istio's rules are not in the pod's netns:\n%s", rules)
	}
	checkCapture(t, k, divertest.Config(t, injectorArgs...))

	// --cleanup-only takes them out again.
	r = initContainer(t, k, nil, divert, "istio-iptables", "--cleanup-only", "--bpffs", opts.BPFFS)
	r.mustSucceed(t, "--cleanup-only")
	if rules := istioRules(t, k.NetNSPath); rules != "" {
		t.Errorf("rules left after --cleanup-only:\n%s", rules)
	}
	divertest.AssertNothingAttached(t, k.view(), opts) // the marker went too
}

// Auto mode falls back only for the kernel: an invalid $DIVERT_CGROUP_ROOT (the hostPath
// volume missing) fails the init container in one line naming it, and writes nothing.
func TestAutoFailsOnBadCgroupRoot(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	missing := filepath.Join(t.TempDir(), "host", "sys", "fs", "cgroup")
	for _, env := range [][]string{{"DIVERT_CGROUP_ROOT=" + missing}, {"DIVERT_CGROUP_ROOT=" + missing, "DIVERT_TEST_FORCE_NO_EBPF=1"}} {
		r := initContainer(t, k, env, divert, append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...)
		if r.code != 1 || !strings.Contains(r.stderr, "$DIVERT_CGROUP_ROOT") || !strings.Contains(r.stderr, missing) ||
			strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || strings.Contains(r.stderr, "using iptables") {
			t.Errorf("%v: want exit 1 and one line naming $DIVERT_CGROUP_ROOT, got %d\nstdout: %s\nstderr: %s", env, r.code, r.stdout, r.stderr)
		}
		divertest.AssertNothingAttached(t, k.view(), opts)
		if rules := istioRules(t, k.NetNSPath); rules != "" {
			t.Errorf("%v: iptables rules written:\n%s", env, rules)
		}
	}
}

// --mode iptables needs no pod cgroup, and --cleanup-only still removes the rules where no
// pod cgroup can be named (then no eBPF attachment can have been made either).
func TestIptablesModeWithoutPodCgroup(t *testing.T) {
	divert := image.Divert(t)
	pod := testpod.New(t)
	k := &k8sPod{Pod: pod, Dir: pod.CgroupPath, layout: layout{"parent", nil, func(id string) string { return "ctr-" + id[:12] }, "init-ctr"}}
	opts := divertest.BPFFS(t)
	r := initContainer(t, k, nil, divert, append([]string{"istio-iptables", "--mode", "iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...)
	r.mustSucceed(t, "--mode iptables")
	if r.stderr != "" || !strings.Contains(istioRules(t, pod.NetNSPath), "-A ISTIO_OUTPUT") {
		t.Fatalf("rules not applied; stderr %q", r.stderr)
	}
	checkCapture(t, k, divertest.Config(t, injectorArgs...))
	r = initContainer(t, k, nil, divert, "istio-iptables", "--cleanup-only", "--bpffs", opts.BPFFS)
	r.mustSucceed(t, "--cleanup-only")
	if !strings.Contains(r.stdout, "no eBPF attachment to remove: missing --pod-id") {
		t.Errorf("stdout: %s", r.stdout)
	}
	if rules := istioRules(t, pod.NetNSPath); rules != "" {
		t.Errorf("rules left:\n%s", rules)
	}
	divertest.AssertNothingAttached(t, pod, opts)
}

// A setting the eBPF programs cannot express (an excluded interface) falls back like a
// kernel that lacks something: the reason in one line, istio's rules with the setting in the
// pod's netns, the fallback recorded for divert status; --mode ebpf fails with that line.
func TestSettingFallsBackToIptables(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	why := "-c/--istio-exclude-interfaces net1: eBPF cannot exclude interfaces"
	args := append([]string{"istio-iptables", "--mode", "ebpf", "--bpffs", opts.BPFFS}, injectorArgs...)
	r := initContainer(t, k, []string{"ISTIO_EXCLUDE_INTERFACES=net1"}, divert, args...)
	if r.code != 1 || !strings.Contains(r.stderr, "--mode ebpf") || !strings.Contains(r.stderr, why) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("--mode ebpf: want exit 1 and one line with the reason, got %d %q", r.code, r.stderr)
	}
	divertest.AssertNothingAttached(t, k.view(), opts)

	args = append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)
	r = initContainer(t, k, []string{"ISTIO_EXCLUDE_INTERFACES=net1"}, divert, args...)
	r.mustSucceed(t, "istio-iptables -c net1")
	if lines := strings.Split(strings.TrimSpace(r.stderr), "\n"); len(lines) != 1 || !strings.Contains(lines[0], why) || !strings.Contains(lines[0], "using iptables") {
		t.Errorf("want one line on stderr with the reason, got %q", r.stderr)
	}
	if n := divertest.AttachedPrograms(t, k.view()); n != 0 {
		t.Errorf("%d programs attached after the fallback", n)
	}
	out, err := exec.Command(divert, "status", "--bpffs", opts.BPFFS).CombinedOutput()
	if want := "pod " + k.UID + ": iptables fallback: " + why; err != nil || !strings.Contains(string(out), want) {
		t.Errorf("divert status should list the fallback (%q): %v\n%s", want, err, out)
	}
	// -c's rules are in the kernel's chains, which istioRules leaves out.
	saved := func() string {
		var all []byte
		for _, save := range []string{"iptables-nft-save", "iptables-legacy-save"} {
			out, err := nsexec.CombinedOutput(k.NetNSPath, exec.Command(save))
			if err != nil {
				t.Fatalf("%s: %v\n%s", save, err, out)
			}
			all = append(all, out...)
		}
		return string(all)
	}
	if rules := saved(); !strings.Contains(rules, "-A OUTPUT -o net1 -j RETURN") || !strings.Contains(rules, "-A PREROUTING -i net1 -j RETURN") {
		t.Errorf("istio's rules for -c net1 are not in the pod's netns:\n%s", rules)
	}
	r = initContainer(t, k, nil, divert, "istio-iptables", "--cleanup-only", "--bpffs", opts.BPFFS)
	r.mustSucceed(t, "--cleanup-only")
	if rules := istioRules(t, k.NetNSPath); rules != "" || strings.Contains(saved(), "net1") {
		t.Errorf("rules left after --cleanup-only:\n%s", saved())
	}
	divertest.AssertNothingAttached(t, k.view(), opts)
}

// --mode ebpf does not fall back: it fails with the probe's reason and changes nothing.
func TestModeEBPFFailsWithReason(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	r := initContainer(t, k, []string{"DIVERT_TEST_FORCE_NO_EBPF=1"}, divert,
		append([]string{"istio-iptables", "--mode", "ebpf", "--bpffs", opts.BPFFS}, injectorArgs...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "--mode ebpf") || !strings.Contains(r.stderr, "DIVERT_TEST_FORCE_NO_EBPF") ||
		strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("want exit 1 and one line with the reason, got %d %q", r.code, r.stderr)
	}
	requireUncaptured(t, k, opts)
}

// -n prints the plan (eBPF) or the rules (iptables) and changes nothing.
func TestDryRun(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	args := append([]string{"istio-iptables", "-n", "--bpffs", opts.BPFFS}, injectorArgs...)

	r := initContainer(t, k, nil, divert, args...)
	r.mustSucceed(t, "dry run")
	for _, want := range []string{"backend: ebpf", "would attach divert_connect4 (CGroupInet4Connect) to cgroup " + k.Dir,
		"pinned as " + filepath.Join(loader.PinDir(opts, k.UID), "link_connect4")} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("dry run lacks %q:\n%s", want, r.stdout)
		}
	}
	r = initContainer(t, k, []string{"DIVERT_TEST_FORCE_NO_EBPF=1"}, divert, args...)
	r.mustSucceed(t, "dry run, iptables")
	if !strings.Contains(r.stdout, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT") {
		t.Errorf("iptables dry run should print the rules:\n%s", r.stdout)
	}
	requireUncaptured(t, k, opts)
}

// --cleanup-only removes an eBPF attachment made by an earlier init container.
func TestCleanupOnlyEBPF(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	initContainer(t, k, nil, divert, append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...).mustSucceed(t, "attach")
	requireEBPF(t, k.view())
	r := initContainer(t, k, nil, divert, "istio-iptables", "--cleanup-only", "--bpffs", opts.BPFFS)
	r.mustSucceed(t, "--cleanup-only")
	if !strings.Contains(r.stdout, "detached pod "+k.UID) {
		t.Errorf("stdout: %s", r.stdout)
	}
	divertest.AssertNothingAttached(t, k.view(), opts)
}

// Settings divert does not implement, and bad ones, are refused by the binary too, naming
// them, whether they come as flags or as the environment variables istio reads.
func TestRefusedSettings(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	for _, c := range []struct {
		env  []string
		args []string
		want string
	}{
		{nil, []string{"--redirect-dns", "--resolv-conf", "/nonexistent"}, "--resolv-conf"},
		{[]string{"ISTIO_META_DNS_CAPTURE=maybe"}, nil, "$ISTIO_META_DNS_CAPTURE"},
		{nil, []string{"-c", "net+"}, "--istio-exclude-interfaces"},
		{nil, []string{"-k", "eth1", "-m", "TPROXY"}, "--kube-virt-interfaces with -m TPROXY"},
	} {
		args := append(append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...), c.args...)
		r := initContainer(t, k, c.env, divert, args...)
		if r.code != 1 || !strings.Contains(r.stderr, c.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("%v %v: want exit 1 and one line naming %s, got %d %q", c.env, c.args, c.want, r.code, r.stderr)
		}
	}
	divertest.AssertNothingAttached(t, k.view(), opts)
}

// divert validate (istio-validation's job) passes on a captured pod: as uid 1337 like
// istio's validation container, with istio-validation's own command line, and as root with
// an outbound check too; it fails with a diagnosis and exit 126 where nothing captures.
func TestValidate(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	initContainer(t, k, nil, divert, append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...).mustSucceed(t, "attach")
	t.Cleanup(func() { loader.Detach(k.UID, opts) })

	r := run(t, k.container(t), proxyUID, proxyUID, nil, divert, "validate")
	r.mustSucceed(t, "validate as uid 1337")
	if !strings.Contains(r.stdout, "ok: 127.0.0.6:15002 as uid 1337 (the proxy): captured to the inbound port 15006, SO_ORIGINAL_DST reads 127.0.0.6:15002") {
		t.Errorf("stdout: %s", r.stdout)
	}
	istioValidation := append(append([]string{"istio-iptables"}, injectorArgs...), "--log_output_level=default:info", "--run-validation", "--skip-rule-apply")
	run(t, k.container(t), proxyUID, proxyUID, nil, divert, istioValidation...).mustSucceed(t, "istio-validation's command line")

	remote := netip.AddrPortFrom(k.Net.Addrs[0], 80)
	r = run(t, k.container(t), 0, 0, nil, divert, "validate", "--outbound", remote.String())
	r.mustSucceed(t, "validate as root with --outbound")
	if !strings.Contains(r.stdout, "ok: "+remote.String()+" as uid 65534 (an application): captured to the outbound port 15001") {
		t.Errorf("stdout: %s", r.stdout)
	}

	bare := newK8sPod(t, cgroupfsLayout)
	r = run(t, bare.container(t), proxyUID, proxyUID, nil, divert, "validate", "--probe-timeout", "1s")
	if r.code != 126 || !strings.Contains(r.stdout, "FAIL: 127.0.0.6:15002") || !strings.Contains(r.stderr, "not captured: connection refused") {
		t.Fatalf("an uncaptured pod: want exit 126 and a diagnosis, got %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
}

// What happens when the pod goes away. The kernel detaches the cgroup links with the pod's
// cgroup (their info then says cgroup 0); the pins stay until divert gc removes them.
func TestPodGoneThenGC(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	initContainer(t, k, nil, divert, append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...).mustSucceed(t, "attach")
	t.Cleanup(func() { loader.Detach(k.UID, opts) })

	app := k.container(t)
	proxy := app.Proxy(t, "proxy", netip.AddrPortFrom(anyAddr, 15001), "report", proxyUID, proxyUID)
	dst := netip.AddrPortFrom(k.Net.Addrs[0], 80)
	if res := app.Dial(t, appUID, appUID, testpod.Target{Dst: dst})[0]; len(res.Hops) != 1 || res.Hops[0].Orig != dst.String() {
		t.Fatalf("not captured: %+v", res)
	}
	if gone, err := loader.Defunct(k.UID, opts); err != nil || len(gone) != 0 {
		t.Fatalf("a live pod is not defunct: %v %v", gone, err)
	}

	// The pod ends: its processes exit and kubelet removes its cgroups.
	proxy.Stop()
	rmdirCgroup(t, app.CgroupPath)
	for d := k.Dir; d != k.Pod.CgroupPath; d = filepath.Dir(d) {
		rmdirCgroup(t, d)
	}
	// Every program but sk_lookup is attached to the cgroup.
	live, err := loader.Status(k.UID, opts)
	if err != nil {
		t.Fatal(err)
	}
	var cgroupLinks []string
	for _, p := range live.Programs {
		if p.Name != "divert_sk_lookup" {
			cgroupLinks = append(cgroupLinks, p.Name)
		}
	}
	slices.Sort(cgroupLinks)
	var gone []string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		var err error
		if gone, err = loader.Defunct(k.UID, opts); err != nil {
			t.Fatal(err)
		}
		if len(gone) == len(cgroupLinks) {
			break
		}
	}
	slices.Sort(gone)
	if len(cgroupLinks) < 4 || !slices.Equal(gone, cgroupLinks) {
		t.Fatalf("after the pod's cgroup went, the kernel should have detached the cgroup links %v, got %v", cgroupLinks, gone)
	}
	st, err := loader.Status(k.UID, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Programs {
		if (p.Name == "divert_sk_lookup") != (p.CgroupID == 0 && p.NetNSIno != 0) {
			t.Errorf("%s: cgroup %d netns %d; cgroup links should report cgroup 0, sk_lookup its live netns", p.Name, p.CgroupID, p.NetNSIno)
		}
	}
	assertPinned(t, opts, k.UID) // nothing removed them: that is gc's job
	out, err := exec.Command(divert, "status", "--bpffs", opts.BPFFS, "--pod-id", k.UID).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "pod "+k.UID+" (defunct") || !strings.Contains(string(out), "divert_connect4    CGroupInet4Connect   link") ||
		strings.Count(string(out), "detached (its cgroup or netns is gone)") != len(cgroupLinks) {
		t.Errorf("divert status should call the pod defunct and its %d cgroup links detached: %v\n%s", len(cgroupLinks), err, out)
	}

	out, err = exec.Command(divert, "gc", "--bpffs", opts.BPFFS, "-n").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "would remove "+k.UID) {
		t.Fatalf("gc -n: %v\n%s", err, out)
	}
	out, err = exec.Command(divert, "gc", "--bpffs", opts.BPFFS).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "removed "+k.UID) {
		t.Fatalf("gc: %v\n%s", err, out)
	}
	divertest.AssertNothingAttached(t, k.Pod, opts) // the sk_lookup link was detached by gc
	if out, err = exec.Command(divert, "gc", "--bpffs", opts.BPFFS).CombinedOutput(); err != nil || !strings.Contains(string(out), "nothing to remove") {
		t.Errorf("second gc: %v\n%s", err, out)
	}
}

// A pod whose sandbox was recreated keeps its cgroup but gets a new network namespace, and
// its init container runs again: the pins of the old sandbox, whose sk_lookup link the
// kernel detached with the old namespace, are replaced rather than refused.
func TestSandboxRecreated(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	old := "dvt-old-" + randHex(t, 8)
	if out, err := exec.Command("ip", "netns", "add", old).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", old).Run() })
	oldPod := loader.Pod{ID: k.UID, Cgroup: k.Dir, NetNS: "/run/netns/" + old}
	if err := loader.Attach(context.Background(), oldPod, divertest.Config(t, injectorArgs...), opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(k.UID, opts) })
	if out, err := exec.Command("ip", "netns", "del", old).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v %s", err, out)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		gone, err := loader.Defunct(k.UID, opts)
		if err != nil {
			t.Fatal(err)
		}
		if len(gone) == 1 && gone[0] == "divert_sk_lookup" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the old sandbox's sk_lookup link should be detached, defunct: %v", gone)
		}
	}

	r := initContainer(t, k, nil, divert, append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...)
	r.mustSucceed(t, "istio-iptables in the new sandbox")
	if !strings.Contains(r.stdout, "removed a stale attachment of pod "+k.UID+" (divert_sk_lookup detached by the kernel)") {
		t.Errorf("stdout: %s", r.stdout)
	}
	if gone, err := loader.Defunct(k.UID, opts); err != nil || len(gone) != 0 {
		t.Fatalf("after re-attach: defunct %v, %v", gone, err)
	}
	checkCapture(t, k, divertest.Config(t, injectorArgs...))
}

// An init container in a cgroup namespace sees "0::/" in /proc/self/cgroup and its own
// cgroup at the top of its /sys/fs/cgroup. The pod is then found by the inode of that
// cgroup in the host's tree, mounted elsewhere and given as --cgroup-root.
func TestCgroupNamespace(t *testing.T) {
	divert := image.Divert(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatalf("unshare (util-linux) is required: %v", err)
	}
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	// Mounted only inside the init container's private mount namespace: the host's tree
	// (as a hostPath volume would show it) and the namespace's own view of cgroup2 (as the
	// runtime mounts a container's /sys/fs/cgroup; the kernel refuses to mount it over the
	// host's mount of the same file system, so it goes beside it).
	host, view := t.TempDir(), t.TempDir()
	script := fmt.Sprintf(`mount --bind %s %s && mount -t cgroup2 cgroup2 %s && grep -q '^0::/$' /proc/self/cgroup && "$0" "$@" --cgroup-root %s`,
		divertest.Cgroup2Mount(t), host, view, host)
	c := k.container(t)
	r := runWrapped(t, c, 0, 0, []string{unshare, "--cgroup", "--mount", "--propagation", "private"}, script, divert,
		append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...)
	r.mustSucceed(t, "istio-iptables in a cgroup namespace")
	t.Cleanup(func() { loader.Detach(k.UID, opts) })
	rmdirCgroup(t, c.CgroupPath)
	if !strings.Contains(r.stdout, "attached pod "+k.UID) {
		t.Errorf("stdout: %s", r.stdout)
	}
	requireEBPF(t, k.view())
	checkCapture(t, k, divertest.Config(t, injectorArgs...))
}

// One backend per pod: --mode iptables with another iptables backend replaces the first's
// rules, an eBPF run replaces istio's rules, and --mode iptables after eBPF detaches it.
// Two captures at once would send a connection through the proxy twice, or lose its
// original destination.
func TestBackendsReplaceEachOther(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	args := append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)
	t.Cleanup(func() { loader.Detach(k.UID, opts) })

	initContainer(t, k, nil, divert, append(args, "--mode", "iptables", "--iptables-backend", "nft")...).mustSucceed(t, "--mode iptables (nft)")
	r := initContainer(t, k, nil, divert, append(args, "--mode", "iptables", "--iptables-backend", "legacy")...)
	r.mustSucceed(t, "--mode iptables (legacy)")
	if !strings.Contains(r.stdout, "removed istio's iptables-nft rules, replaced by iptables-legacy") {
		t.Errorf("stdout: %s", r.stdout)
	}
	if n := backendRules(t, "iptables-nft-save", k.NetNSPath); n != 0 {
		t.Errorf("iptables-nft still holds %d istio rules after a legacy apply", n)
	}
	if n := backendRules(t, "iptables-legacy-save", k.NetNSPath); n == 0 {
		t.Fatal("iptables-legacy holds no istio rules")
	}

	r = initContainer(t, k, nil, divert, args...)
	r.mustSucceed(t, "eBPF after iptables")
	if !strings.Contains(r.stdout, "attached pod "+k.UID) || !strings.Contains(r.stdout, "removed istio's iptables rules (iptables-legacy)") {
		t.Errorf("stdout: %s", r.stdout)
	}
	if rules := istioRules(t, k.NetNSPath); rules != "" {
		t.Errorf("istio's rules left under eBPF capture:\n%s", rules)
	}
	requireEBPF(t, k.view())
	checkCapture(t, k, divertest.Config(t, injectorArgs...))

	r = initContainer(t, k, nil, divert, append(args, "--mode", "iptables")...)
	r.mustSucceed(t, "--mode iptables after eBPF")
	if !strings.Contains(r.stdout, "removed the eBPF attachment of pod "+k.UID) {
		t.Errorf("stdout: %s", r.stdout)
	}
	divertest.AssertNothingAttached(t, k.view(), opts)
	if n := backendRules(t, "iptables-nft-save", k.NetNSPath); n == 0 {
		t.Error("no istio rules after --mode iptables")
	}
}

// backendRules counts the istio lines one iptables-save shows in a netns.
func backendRules(t *testing.T, save, netns string) int {
	t.Helper()
	path, err := exec.LookPath(save)
	if err != nil {
		t.Fatal(err)
	}
	out, err := nsexec.CombinedOutput(netns, exec.Command(path))
	if err != nil {
		t.Fatalf("%s: %v\n%s", save, err, out)
	}
	return strings.Count(string(out), "ISTIO_")
}

// The init container gets the loader's protection: a pod cgroup that another pod id's
// divert programs capture (here its parent) is refused in one line naming that pod, and
// nothing is attached, pinned or written; no fallback to iptables either.
func TestCapturedCgroupRefused(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	holder := loader.Pod{ID: "holder-" + randHex(t, 8), Cgroup: k.Pod.CgroupPath, NetNS: k.Net.AddPod(t).NetNSPath}
	if err := loader.Attach(context.Background(), holder, divertest.Config(t), opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(holder.ID, opts) })

	r := initContainer(t, k, nil, divert, append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, injectorArgs...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "pod "+holder.ID+" already captures its ancestor "+k.Pod.CgroupPath) ||
		!strings.Contains(r.stderr, "divert detach --pod-id "+holder.ID) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("want exit 1 and one line naming pod %s, got %d\nstdout: %s\nstderr: %s", holder.ID, r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(loader.PinDir(opts, k.UID)); !os.IsNotExist(err) {
		t.Errorf("pins made for the refused pod: %v", err)
	}
	if n := cgroupPrograms(t, k.Dir); n != 0 {
		t.Errorf("%d programs attached to the refused pod's cgroup", n)
	}
	if rules := istioRules(t, k.NetNSPath); rules != "" {
		t.Errorf("iptables rules written:\n%s", rules)
	}
}
