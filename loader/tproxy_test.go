package loader_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/divertest"
	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
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
	check := func(step string, want returnPath) {
		t.Helper()
		if got := readReturnPath(t, pod); got != want {
			t.Errorf("%s: the pod's netns has %+v, want %+v", step, got, want)
		}
	}
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	attach := func(opts loader.Options, cfg *policy.Config) {
		t.Helper()
		if err := loader.Attach(context.Background(), lp, cfg, opts); err != nil {
			t.Fatalf("attach: %v", err)
		}
	}
	t.Cleanup(func() {
		if err := loader.Detach(pod.Name, opts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
			t.Errorf("detach: %v", err)
		}
	})
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
	if err := loader.Attach(context.Background(), lp, cfg, opts); !errors.Is(err, injected) {
		t.Fatalf("attach returned %v, want the injected failure", err)
	}
	check("after a failed attach", none)
	divertest.AssertNothingAttached(t, pod, opts)
}

type returnPath struct{ rule, route, fwmarkAccept string }

func readReturnPath(t *testing.T, pod *testpod.Pod) returnPath {
	t.Helper()
	var rp returnPath
	out, err := nsexec.CombinedOutput(pod.NetNSPath, exec.Command("ip", "-4", "rule", "show"))
	if err != nil {
		t.Fatalf("ip rule: %v: %s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if i := strings.Index(l, "fwmark"); i >= 0 {
			rp.rule = strings.TrimSpace(l[i:])
		}
	}
	out, err = nsexec.CombinedOutput(pod.NetNSPath, exec.Command("ip", "-4", "route", "show", "table", "all", "type", "local", "dev", "lo"))
	if err != nil {
		t.Fatalf("ip route: %v: %s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "local default") {
			rp.route = strings.TrimSpace(l)
		}
	}
	err = nsexec.Do(pod.NetNSPath, func() error {
		b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_fwmark_accept")
		rp.fwmarkAccept = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return rp
}
