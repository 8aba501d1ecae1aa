package loader_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// TestTProxyReturnPath checks what eBPF mode sets up in the pod's netns for TPROXY mode's
// return path (loader/tproxy.go) and that it goes with the mode and with the pod.
func TestTProxyReturnPath(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	cfg := divertest.Config(t, "-m", "TPROXY")
	if err := loader.CheckPolicy(cfg); err != nil {
		t.Fatalf("TPROXY mode refused: %v", err)
	}
	none := returnPath{fwmarkAccept: "0"}
	istios := returnPath{rule: "fwmark 0x539 lookup 133", route: "local default table 133 scope host", fwmarkAccept: "1"}
	attach, check := followReturnPath(t, pod, opts)
	check("before", none)
	attach(opts, cfg)
	check("attached in TPROXY mode", istios)
	attach(opts, divertest.Config(t))
	check("updated to REDIRECT", none)
	attach(opts, divertest.Config(t, "-m", "TPROXY", "-t", "1400", "-r", "140"))
	check("updated to TPROXY -t 1400 -r 140", returnPath{rule: "fwmark 0x578 lookup 140", route: "local default table 140 scope host", fwmarkAccept: "1"})
	attach(opts, divertest.Config(t, "-m", "TPROXY", "-b", ""))
	check("updated to TPROXY capturing no inbound port", none)
	attach(opts, cfg)
	check("updated to TPROXY again", istios)
	attach(loader.Options{BPFFS: opts.BPFFS, NoInbound: true}, cfg)
	check("updated to outbound only", none)
	attach(opts, cfg)
	check("updated to both directions", istios)
	if err := loader.Detach(pod.Name, opts); err != nil {
		t.Fatal(err)
	}
	check("detached", none)
	// With inbound off there is no return path to set up.
	attach(loader.Options{BPFFS: opts.BPFFS, NoInbound: true}, cfg)
	check("attached with no inbound", none)
	if err := loader.Detach(pod.Name, opts); err != nil {
		t.Fatal(err)
	}
	// An attach that fails after the return path went in leaves none.
	injected := errors.New("injected failure")
	loader.SetTestHookBeforeCommit(func() error {
		check("before the commit of a failing attach", istios)
		return injected
	})
	defer loader.SetTestHookBeforeCommit(nil)
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	if err := loader.Attach(context.Background(), lp, cfg, opts); !errors.Is(err, injected) {
		t.Fatalf("attach returned %v, want the injected failure", err)
	}
	check("after a failed attach", none)
	divertest.AssertNothingAttached(t, pod, opts)
}

// TestTProxyReturnPathIPv6: with IPv6 capture the pod gets istio's ip -6 policy route as
// well (net.ipv4.tcp_fwmark_accept serves both families), and it goes with IPv6 capture,
// the mode and the pod.
func TestTProxyReturnPathIPv6(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	opts := divertest.BPFFS(t)
	cfg := divertest.Config(t, "-m", "TPROXY")
	cfg.IPv6 = true
	if err := loader.CheckPolicy(cfg); err != nil {
		t.Fatalf("TPROXY mode with IPv6 refused: %v", err)
	}
	v4 := returnPath{rule: "fwmark 0x539 lookup 133", route: "local default table 133 scope host", fwmarkAccept: "1"}
	both := v4
	both.rule6, both.route6 = "fwmark 0x539 lookup 133", "local default table 133"
	none := returnPath{fwmarkAccept: "0"}
	attach, check := followReturnPath(t, pod, opts)
	attach(opts, cfg)
	check("attached in TPROXY mode with IPv6", both)
	attach(opts, divertest.Config(t, "-m", "TPROXY"))
	check("updated to IPv4 only", v4)
	attach(opts, cfg)
	check("updated to IPv6 again", both)
	if err := loader.Detach(pod.Name, opts); err != nil {
		t.Fatal(err)
	}
	check("detached", none)
	divertest.AssertNothingAttached(t, pod, opts)
}

// followReturnPath returns attach, which attaches pod with a policy (failing the test on
// error), and check, which requires the return path the pod's netns has; the pod is
// detached when the test ends.
func followReturnPath(t *testing.T, pod *testpod.Pod, opts loader.Options) (attach func(loader.Options, *policy.Config), check func(step string, want returnPath)) {
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	t.Cleanup(func() {
		if err := loader.Detach(pod.Name, opts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
			t.Errorf("detach: %v", err)
		}
	})
	attach = func(opts loader.Options, cfg *policy.Config) {
		t.Helper()
		if err := loader.Attach(context.Background(), lp, cfg, opts); err != nil {
			t.Fatalf("attach: %v", err)
		}
	}
	check = func(step string, want returnPath) {
		t.Helper()
		if got := readReturnPath(t, pod); got != want {
			t.Errorf("%s: the pod's netns has %+v, want %+v", step, got, want)
		}
	}
	return attach, check
}

type returnPath struct{ rule, route, rule6, route6, fwmarkAccept string }

func readReturnPath(t *testing.T, pod *testpod.Pod) returnPath {
	t.Helper()
	var rp returnPath
	rp.rule, rp.route = readPolicyRoute(t, pod, "-4")
	rp.rule6, rp.route6 = readPolicyRoute(t, pod, "-6")
	err := nsexec.Do(pod.NetNSPath, func() error {
		b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_fwmark_accept")
		rp.fwmarkAccept = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return rp
}

// readPolicyRoute reads a TPROXY-shaped policy route of a family ("-4", "-6"): its fwmark
// rule and its local default route on lo.
func readPolicyRoute(t *testing.T, pod *testpod.Pod, family string) (rule, route string) {
	t.Helper()
	out, err := nsexec.CombinedOutput(pod.NetNSPath, exec.Command("ip", family, "rule", "show"))
	if err != nil {
		t.Fatalf("ip %s rule: %v: %s", family, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if i := strings.Index(l, "fwmark"); i >= 0 {
			rule = strings.TrimSpace(l[i:])
		}
	}
	out, err = nsexec.CombinedOutput(pod.NetNSPath, exec.Command("ip", family, "route", "show", "table", "all", "type", "local", "dev", "lo"))
	if err != nil {
		t.Fatalf("ip %s route: %v: %s", family, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "local default") {
			route, _, _ = strings.Cut(strings.TrimSpace(l), " metric ") // IPv6's metric and pref
		}
	}
	return rule, route
}
