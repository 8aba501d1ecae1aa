package istioinit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/spf13/pflag"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// The injector's istio-init command line (after "istio-iptables").
var injectorArgs = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// stubWorld is a machine for istio-iptables mode that these tests can change and that
// changes nothing: an IPv4 pod, a kernel that supports eBPF, a pod cgroup, no user
// namespace. The dry runs here must not attach, detach or touch iptables.
func stubWorld(t *testing.T) *Env {
	t.Helper()
	return &Env{
		Probe: func(loader.Options) error { return nil },
		// The stubbed kernel has every feature, the socket-owner read of owner groups (6.2)
		// too, whatever the host runs; what eBPF cannot express on any kernel is still refused.
		CheckPolicy: func(cfg *policy.Config) error {
			c := *cfg
			c.OutboundOwnerGroups = policy.OwnerGroups{}
			return loader.CheckPolicy(&c)
		},
		FindPod: func(cgroups.Finder) (cgroups.Found, error) {
			return cgroups.Found{Pod: "/sys/fs/cgroup/kubepods/besteffort/pod0b1c-2d", Own: "/sys/fs/cgroup/kubepods/besteffort/pod0b1c-2d/abc",
				UID: "0b1c-2d", Driver: cgroups.Cgroupfs}, nil
		},
		PodAddrs: func() ([]net.Addr, error) {
			return []net.Addr{&net.IPNet{IP: net.IPv4(127, 0, 0, 1), Mask: net.CIDRMask(8, 32)}, &net.IPNet{IP: net.IPv4(10, 244, 0, 5), Mask: net.CIDRMask(24, 32)}}, nil
		},
		InUserNS: func() bool { return false },
		Attach: func(context.Context, loader.Pod, *policy.Config, loader.Options) error {
			t.Error("attached")
			return nil
		},
		Detach:            func(string, loader.Options) error { t.Error("detached"); return nil },
		IptablesAvailable: func() bool { return true },
		ApplyIptables: func(context.Context, string, iptables.Backend, *policy.Config) (iptables.Result, error) {
			t.Error("applied iptables rules")
			return iptables.Result{}, nil
		},
		InstalledIptables: func(context.Context, string) ([]iptables.Backend, error) { return nil, nil },
		CleanupIptables:   func(context.Context, string, iptables.Backend) error { t.Error("cleaned up iptables"); return nil },
	}
}

// runIstio runs istio-iptables mode on w with vars as the environment and args as its
// command line: istio-iptables' policy flags and the few of its others these tests use
// (cmd/divert's tests cover the rest of its flags).
func runIstio(t *testing.T, w *Env, vars map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	return runIstioWith(t, w, nil, vars, args...)
}

// runIstioWith is runIstio with the Options changed by mod, when not nil.
func runIstioWith(t *testing.T, w *Env, mod func(*Options), vars map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	fs := pflag.NewFlagSet("istio-iptables", pflag.ContinueOnError)
	parse := policy.Flags(fs, policy.IstioIptablesDefaults())
	var o Options
	var mode string
	fs.BoolVarP(&o.DryRun, "dry-run", "n", false, "")
	fs.BoolVar(&o.NativeNftables, FlagNativeNftables, false, "")
	fs.StringVar(&mode, "mode", "auto", "")
	fs.StringVar(&o.Loader.BPFFS, "bpffs", loader.DefaultBPFFS, "")
	fs.StringVar(&o.PodID, FlagPodID, "", "")
	fs.StringVar(&o.CgroupRoot, FlagCgroupRoot, "", "")
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	o.Mode, o.CgroupRootSource = Mode(mode), "--"+FlagCgroupRoot
	if v := vars["DIVERT_CGROUP_ROOT"]; v != "" && o.CgroupRoot == "" {
		o.CgroupRoot, o.CgroupRootSource = v, "$DIVERT_CGROUP_ROOT"
	}
	getenv := func(k string) string { return vars[k] }
	if o.Policy, err = parse(getenv); err != nil {
		t.Fatal(err)
	}
	if mod != nil {
		mod(&o)
	}
	var out, errOut bytes.Buffer
	e := *w
	e.Stdout, e.Stderr, e.Getenv = &out, &errOut, getenv
	err = Run(context.Background(), e, o)
	return out.String(), errOut.String(), err
}

// auto: a failed probe means iptables, with the reason in one line on stderr; ebpf: the
// reason is the error.
func TestIstioIptablesProbeFallback(t *testing.T) {
	w := stubWorld(t)
	w.Probe = func(loader.Options) error {
		return fmt.Errorf("this kernel lacks program type SkLookup: %w", ebpf.ErrNotSupported)
	}
	out, errOut, err := runIstio(t, w, nil, append([]string{"-n"}, injectorArgs...)...)
	if err != nil {
		t.Fatal(err)
	}
	if lines := strings.Split(strings.TrimSpace(errOut), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "SkLookup") || !strings.Contains(lines[0], "using iptables") {
		t.Errorf("want one line with the reason on stderr, got %q", errOut)
	}
	if !strings.Contains(out, "backend: iptables") || !strings.Contains(out, "-A ISTIO_OUTPUT") {
		t.Errorf("dry run should print the iptables rules:\n%s", out)
	}

	_, _, err = runIstio(t, w, nil, append([]string{"-n", "--mode", "ebpf"}, injectorArgs...)...)
	if err == nil || !strings.Contains(err.Error(), "SkLookup") || !strings.Contains(err.Error(), "--mode ebpf") {
		t.Errorf("--mode ebpf should fail with the reason, got %v", err)
	}

	// The test hook fails the probe on any kernel.
	w = stubWorld(t)
	_, errOut, err = runIstio(t, w, map[string]string{ForceNoEBPFEnv: "1"}, "-n")
	if err != nil || !strings.Contains(errOut, ForceNoEBPFEnv) {
		t.Errorf("%s=1 should fall back: %v %q", ForceNoEBPFEnv, err, errOut)
	}
	// --native-nftables is fine with eBPF, not with the iptables fallback.
	if _, _, err := runIstio(t, w, map[string]string{ForceNoEBPFEnv: "1"}, "-n", "--native-nftables"); err == nil || !strings.Contains(err.Error(), "--native-nftables") {
		t.Errorf("--native-nftables with iptables: %v", err)
	}
}

// The eBPF dry run names every program, its target and its pin, and the policy.
func TestIstioIptablesDryRunEBPF(t *testing.T) {
	w := stubWorld(t)
	out, _, err := runIstio(t, w, nil, append([]string{"-n", "--bpffs", "/nonexistent/bpffs"}, injectorArgs...)...)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"backend: ebpf",
		"pod 0b1c-2d: cgroup /sys/fs/cgroup/kubepods/besteffort/pod0b1c-2d (cgroupfs layout",
		"would attach divert_connect4 (CGroupInet4Connect) to cgroup /sys/fs/cgroup/kubepods/besteffort/pod0b1c-2d, pinned as /nonexistent/bpffs/divert/0b1c-2d/link_connect4",
		"would attach divert_sk_lookup (SkLookup) to netns /proc/self/ns/net",
		"policy: -p 15001 -z 15006 -e 15008 -u 1337 -g 1337 -m REDIRECT",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "tcp_fwmark_accept") {
		t.Errorf("REDIRECT mode's dry run plans TPROXY's return path:\n%s", out)
	}
	// TPROXY mode adds its return path to the pod's netns.
	out, _, err = runIstio(t, w, nil, append(append([]string{"-n", "--bpffs", "/nonexistent/bpffs"}, injectorArgs...), "-m", "TPROXY", "-t", "1400", "-r", "140")...)
	want := "would set net.ipv4.tcp_fwmark_accept=1 and add ip rule fwmark 1400 lookup 140 and route local default dev lo table 140 (TPROXY mode's return path) in netns /proc/self/ns/net"
	if err != nil || !strings.Contains(out, want) {
		t.Errorf("TPROXY dry run (%v) lacks %q:\n%s", err, want, out)
	}
	// With IPv6 captured, istio's ip -6 policy route too.
	w.PodAddrs = func() ([]net.Addr, error) {
		return []net.Addr{&net.IPNet{IP: net.ParseIP("fd00::5"), Mask: net.CIDRMask(64, 128)}}, nil
	}
	out, _, err = runIstio(t, w, nil, append(append([]string{"-n", "--bpffs", "/nonexistent/bpffs"}, injectorArgs...), "-m", "TPROXY")...)
	want = "would set net.ipv4.tcp_fwmark_accept=1 and add ip and ip -6 rule fwmark 1337 lookup 133 and route local default dev lo table 133 (TPROXY mode's return path)"
	if err != nil || !strings.Contains(out, want) {
		t.Errorf("IPv6 TPROXY dry run (%v) lacks %q:\n%s", err, want, out)
	}
	// A layout with no pod UID needs --pod-id.
	w.FindPod = func(cgroups.Finder) (cgroups.Found, error) {
		return cgroups.Found{Pod: "/sys/fs/cgroup/test/p1", Own: "/sys/fs/cgroup/test/p1/init", Driver: cgroups.Parent}, nil
	}
	_, _, err = runIstio(t, w, nil, "-n", "--mode", "ebpf")
	if err == nil || !strings.Contains(err.Error(), "--pod-id") {
		t.Errorf("want an error naming --pod-id, got %v", err)
	}
	if out, _, err = runIstio(t, w, nil, "-n", "--mode", "ebpf", "--pod-id", "p1"); err != nil || !strings.Contains(out, "pod p1: cgroup /sys/fs/cgroup/test/p1 (parent layout") {
		t.Errorf("--pod-id with the parent layout: %v\n%s", err, out)
	}
}

// auto falls back to iptables only on the kernel's verdict (ebpf.ErrNotSupported): a wrong
// setting, a missing mount or a pod cgroup that cannot be found fails in one line naming
// the setting and the fix, and prints no rules.
func TestIstioIptablesAutoFailsOnInputErrors(t *testing.T) {
	notFound := func(cgroups.Finder) (cgroups.Found, error) {
		return cgroups.Found{}, fmt.Errorf("%w: this process's cgroup \"/x\" is not below a Kubernetes pod cgroup", cgroups.ErrNotFound)
	}
	missing := "/nonexistent/host/sys/fs/cgroup"
	cases := []struct {
		name  string
		env   map[string]string
		args  []string
		setup func(w *Env)
		want  []string
	}{
		{"cgroup root from the environment", map[string]string{"DIVERT_CGROUP_ROOT": missing}, nil, nil, []string{"$DIVERT_CGROUP_ROOT", missing, "hostPath"}},
		{"cgroup root flag", nil, []string{"--cgroup-root", missing}, nil, []string{"--cgroup-root", missing}},
		{"cgroup root not a cgroup mount", nil, []string{"--cgroup-root", t.TempDir()}, nil, []string{"--cgroup-root", "no cgroup2 file system is mounted at or below it"}},
		{"cgroup root, and the kernel lacks eBPF too", map[string]string{"DIVERT_CGROUP_ROOT": missing, ForceNoEBPFEnv: "1"}, nil, nil, []string{"$DIVERT_CGROUP_ROOT"}},
		{"no pod cgroup", nil, nil, func(w *Env) { w.FindPod = notFound }, []string{"pod cgroup not found", "--cgroup-root", "$DIVERT_CGROUP_ROOT", "--cgroup"}},
		{"a probe error that is not the kernel's verdict", nil, nil, func(w *Env) {
			w.Probe = func(loader.Options) error { return errors.New("open /sys/fs/bpf: input/output error") }
		}, []string{"input/output error"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := stubWorld(t)
			if c.setup != nil {
				c.setup(w)
			}
			out, errOut, err := runIstio(t, w, c.env, append(append([]string{"-n"}, c.args...), injectorArgs...)...)
			if err == nil {
				t.Fatalf("accepted; stdout:\n%s\nstderr: %s", out, errOut)
			}
			for _, want := range c.want {
				if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, want) {
					t.Errorf("want one line with %q, got %q", want, msg)
				}
			}
			if strings.Contains(out, "ISTIO_") || strings.Contains(errOut, "using iptables") {
				t.Errorf("fell back: stdout %q stderr %q", out, errOut)
			}
		})
	}
}

// IPv6 is decided from the pod's addresses as istio-iptables decides it, and eBPF mode
// captures both families: auto keeps eBPF and its plan names the families, --mode ebpf
// too, --mode iptables renders both families' rules exactly when istio would.
func TestIstioIptablesIPv6Pod(t *testing.T) {
	v6 := &net.IPNet{IP: net.ParseIP("fd00::5"), Mask: net.CIDRMask(64, 128)}
	v4 := &net.IPNet{IP: net.ParseIP("10.244.0.5"), Mask: net.CIDRMask(24, 32)}
	linkLocal := &net.IPNet{IP: net.ParseIP("fe80::1"), Mask: net.CIDRMask(64, 128)}
	loopback6 := &net.IPNet{IP: net.IPv6loopback, Mask: net.CIDRMask(128, 128)}
	const (
		v4rules = "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"
		v6rules = "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN"
	)
	for _, c := range []struct {
		name     string
		addrs    []net.Addr
		env      map[string]string
		families string // as the plan names them
	}{
		{"IPv6 pod", []net.Addr{loopback6, linkLocal, v6}, nil, "IPv4 and IPv6 (the pod has IPv6 addresses only)"},
		{"dual-stack pod", []net.Addr{v4, linkLocal, v6}, nil, "IPv4"},
		{"dual-stack pod, IPv6 listed first", []net.Addr{v6, v4}, nil, "IPv4"},
		{"dual-stack pod, $ISTIO_DUAL_STACK", []net.Addr{v4, v6}, map[string]string{"ISTIO_DUAL_STACK": "true"}, "IPv4 and IPv6 (dual stack"},
		{"dual-stack pod, $DUAL_STACK", []net.Addr{v4, v6}, map[string]string{"DUAL_STACK": "true"}, "IPv4 and IPv6 (dual stack"},
		{"dual-stack pod, $ISTIO_AGENT_DUAL_STACK is not read", []net.Addr{v4, v6}, map[string]string{"ISTIO_AGENT_DUAL_STACK": "true"}, "IPv4"},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := stubWorld(t)
			w.PodAddrs = func() ([]net.Addr, error) { return c.addrs, nil }
			ipv6 := c.families != "IPv4"
			for _, mode := range [][]string{nil, {"--mode", "ebpf"}} {
				out, errOut, err := runIstio(t, w, c.env, append(append(injectorArgs, "-n"), mode...)...)
				plan := "backend: ebpf (the kernel supports divert's programs), " + c.families
				if err != nil || !strings.Contains(out, plan) || strings.Contains(errOut, "using iptables") {
					t.Errorf("%v: want the eBPF plan with %q, got %v\nstdout %s\nstderr %q", mode, plan, err, out, errOut)
				}
				if agent := c.env["ISTIO_AGENT_DUAL_STACK"] != ""; agent != strings.Contains(errOut, "$ISTIO_AGENT_DUAL_STACK is not read") {
					t.Errorf("%v: stderr: %q", mode, errOut)
				}
			}
			out, errOut, err := runIstio(t, w, c.env, append(injectorArgs, "-n", "--mode", "iptables")...)
			if err != nil || strings.Contains(errOut, "using iptables") || !strings.Contains(out, v4rules) || strings.Contains(out, v6rules) != ipv6 ||
				strings.Contains(out, "# ip6tables-restore") != ipv6 {
				t.Errorf("--mode iptables (IPv6 rules wanted: %v): %v, stderr %q, stdout:\n%s", ipv6, err, errOut, out)
			}
		})
	}
}

// A pod in a user namespace cannot use eBPF uid matching: auto falls back. Only the
// initial namespace's identity map over all ids is no user namespace.
func TestIstioIptablesUserNamespaceFallsBack(t *testing.T) {
	for content, want := range map[string]bool{"0 100000 65536\n": true, "         0          0 4294967295\n": false, "0 0 65536\n": true} {
		if got := InUserNS(writeTemp(t, content)); got != want {
			t.Errorf("uid_map %q: in a user namespace %v, want %v", content, got, want)
		}
	}
	if InUserNS("/nonexistent/uid_map") {
		t.Error("an unreadable uid_map is no user namespace (as before: eBPF is tried)")
	}
	w := stubWorld(t)
	uidMap := writeTemp(t, "0 100000 65536\n")
	w.InUserNS = func() bool { return InUserNS(uidMap) }
	_, errOut, err := runIstio(t, w, nil, "-n")
	if err != nil || !strings.Contains(errOut, "user namespace") {
		t.Fatalf("want a fallback naming the user namespace: %v %q", err, errOut)
	}
}

func writeTemp(t *testing.T, content string) string {
	t.Helper()
	p := t.TempDir() + "/f"
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// Settings the eBPF programs cannot express fall back to iptables in auto mode, with the
// reason in one line, and fail --mode ebpf with that line; --drop-invalid is accepted with
// eBPF, saying why it needs nothing there.
func TestIstioIptablesSettings(t *testing.T) {
	w := stubWorld(t)
	for _, c := range []struct {
		args []string
		env  map[string]string
		why  string // the reason, "" when eBPF is used
		rule string // in the rules iptables would apply
	}{
		{[]string{"-c", "net1"}, nil, "-c/--istio-exclude-interfaces net1: eBPF cannot exclude interfaces", "-A OUTPUT -o net1 -j RETURN"},
		{nil, map[string]string{"ISTIO_EXCLUDE_INTERFACES": "net1"}, "-c/--istio-exclude-interfaces net1: eBPF cannot exclude interfaces", "-A PREROUTING -i net1 -j RETURN"},
		{[]string{"-k", "eth1"}, nil, "-k/--kube-virt-interfaces eth1: eBPF cannot capture a virtual interface's traffic", "-I PREROUTING 1 -i eth1 -j ISTIO_REDIRECT"},
		{nil, map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "1000,root"}, "", "-m owner ! --gid-owner 1000 -m owner ! --gid-owner 0 -j RETURN"},
		{nil, map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "3000"}, "", "-A ISTIO_OUTPUT -m owner --gid-owner 3000 -j RETURN"},
		{[]string{"--drop-invalid"}, nil, "", "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP"},
		{nil, map[string]string{"INVALID_DROP": "true"}, "", "-A ISTIO_DROP -j DROP"},
	} {
		name := fmt.Sprint(c.args, c.env)
		out, errOut, err := runIstio(t, w, c.env, append([]string{"-n"}, append(injectorArgs, c.args...)...)...)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c.why == "" {
			if !strings.Contains(out, "backend: ebpf") || errOut != "" {
				t.Errorf("%s: want eBPF, got stdout\n%s\nstderr %q", name, out, errOut)
			}
			if (c.args != nil || c.env["INVALID_DROP"] != "") != strings.Contains(out, loader.DropInvalidNote) {
				t.Errorf("%s: the --drop-invalid note, or its absence, is wrong:\n%s", name, out)
			}
		} else {
			if lines := strings.Split(strings.TrimSpace(errOut), "\n"); len(lines) != 1 || !strings.Contains(lines[0], c.why) || !strings.Contains(lines[0], "using iptables") {
				t.Errorf("%s: want one line with the reason on stderr, got %q", name, errOut)
			}
			if !strings.Contains(out, c.rule) {
				t.Errorf("%s: the fallback's rules lack %q:\n%s", name, c.rule, out)
			}
			_, _, err := runIstio(t, w, c.env, append([]string{"-n", "--mode", "ebpf"}, append(injectorArgs, c.args...)...)...)
			if err == nil || !strings.Contains(err.Error(), "--mode ebpf") || !strings.Contains(err.Error(), c.why) || strings.Contains(err.Error(), "\n") {
				t.Errorf("%s: --mode ebpf should fail with the reason, got %v", name, err)
			}
		}
		out, _, err = runIstio(t, w, c.env, append([]string{"-n", "--mode", "iptables"}, append(injectorArgs, c.args...)...)...)
		if err != nil || !strings.Contains(out, c.rule) {
			t.Errorf("%s: --mode iptables should render %q: %v\n%s", name, c.rule, err, out)
		}
	}

	// Owner groups on a kernel whose programs cannot read the socket's group fall back too.
	w.CheckPolicy = func(*policy.Config) error {
		return &loader.PolicyError{Setting: "$ISTIO_OUTBOUND_OWNER_GROUPS", Why: "needs Linux 6.2 or later"}
	}
	_, errOut, err := runIstio(t, w, map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "1000"}, append([]string{"-n"}, injectorArgs...)...)
	if err != nil || !strings.Contains(errOut, "$ISTIO_OUTBOUND_OWNER_GROUPS: needs Linux 6.2 or later); using iptables") {
		t.Errorf("owner groups on an old kernel: %v %q", err, errOut)
	}
}
