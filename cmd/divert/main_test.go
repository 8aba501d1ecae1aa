package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested()
	runCLIChildIfRequested()
	os.Exit(m.Run())
}

func runCLI(t *testing.T, env map[string]string, args ...string) (stdout string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	e := env2(env, &out, &errOut)
	err = run(context.Background(), args, e)
	return out.String(), err
}

func env2(vars map[string]string, out, errOut *bytes.Buffer) env {
	return env{stdout: out, stderr: errOut, getenv: func(k string) string { return vars[k] }}
}

// Bad input gets one line naming the flag, and leaves nothing attached or pinned.
func TestAttachBadInputChangesNothing(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	base := func(extra ...string) []string {
		return append([]string{"attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, extra...)
	}
	cases := []struct {
		name string
		args []string
		env  map[string]string
		flag string // must appear in the error
	}{
		{"bad CIDR", base("-x", "10.0.0.0/33"), nil, "--istio-service-exclude-cidr"},
		{"not a CIDR", base("-i", "ten.0.0.0/8"), nil, "--istio-service-cidr"},
		{"port 0", base("-p", "0"), nil, "--envoy-port"},
		{"port 70000", base("-q", "70000"), nil, "--istio-outbound-ports"},
		{"bad env port", base(), map[string]string{"ENVOY_PORT": "70000"}, "--envoy-port"},
		{"unknown mode", base("-m", "NAT"), nil, "--istio-inbound-interception-mode"},
		{"same proxy ports", base("-p", "15006"), nil, "--envoy-port"},
		{"missing cgroup", []string{"attach", "--pod-id", pod.Name, "--cgroup", "/sys/fs/cgroup/no-such-pod", "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, nil, "--cgroup"},
		{"not a cgroup", []string{"attach", "--pod-id", pod.Name, "--cgroup", os.TempDir(), "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, nil, "--cgroup"},
		{"not a netns", []string{"attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", os.TempDir(), "--bpffs", opts.BPFFS}, nil, "--netns"},
		{"missing netns", []string{"attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", "/run/netns/divert-no-such-pod", "--bpffs", opts.BPFFS}, nil, "/proc/<pid>/ns/net"},
		{"space-separated -o", base("-o", "3306 5432"), nil, "separate the items with commas, like 3306,5432"},
		{"IPv6 -i /129", base("-i", "fd00::/129"), nil, "--istio-service-cidr"},
		{"v4-mapped -x", base("-x", "10.96.0.0/12,::ffff:10.0.0.0/104"), nil, "--istio-service-exclude-cidr"},
		{"bad pod id", []string{"attach", "--pod-id", "ns.pod", "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, nil, "--pod-id"},
		{"missing pod id", []string{"attach", "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, nil, "--pod-id"},
		{"cgroup root", []string{"attach", "--pod-id", pod.Name, "--cgroup", divertest.Cgroup2Mount(t), "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, nil, "--cgroup"},
		{"bpffs not bpffs", []string{"attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", t.TempDir()}, nil, "--bpffs"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := runCLI(t, c.env, c.args...)
			if err == nil {
				t.Fatal("attach succeeded")
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") || !strings.Contains(msg, c.flag) {
				t.Errorf("error should be one line naming %s, got %q", c.flag, msg)
			}
			divertest.AssertNothingAttached(t, pod, opts)
		})
	}
}

// The hint for a missing --pod-id suggests a name attach then accepts.
func TestAttachPodIDHintIsAccepted(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	_, err := runCLI(t, nil, "attach", "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS)
	if err == nil {
		t.Fatal("attach without --pod-id succeeded")
	}
	_, hint, ok := strings.Cut(err.Error(), "e.g. --pod-id ")
	if !ok {
		t.Fatalf("no example in %q", err)
	}
	id := strings.Fields(hint)[0]
	if _, err := runCLI(t, nil, "attach", "--pod-id", id, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS); err != nil {
		t.Fatalf("the suggested --pod-id %s is refused: %v", id, err)
	}
	if err := loader.Detach(id, opts); err != nil {
		t.Fatal(err)
	}
	divertest.AssertNothingAttached(t, pod, opts)
}

// status and gc on a --bpffs that is not a bpffs mount say so and fail, instead of "no pods
// attached" (exit 0) or a raw error; explain --pod-id too.
func TestBPFFSNotMounted(t *testing.T) {
	notBPFFS := t.TempDir()
	if err := os.Mkdir(notBPFFS+"/divert", 0o700); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"status", "--bpffs", notBPFFS},
		{"status", "--bpffs", notBPFFS, "-o", "json"},
		{"status", "--bpffs", notBPFFS, "--pod-id", "web"},
		{"gc", "--bpffs", notBPFFS},
		{"gc", "--bpffs", notBPFFS, "--dry-run"},
		{"gc", "--bpffs", "/etc/hostname"},
		{"to-iptables", "--bpffs", notBPFFS},
		{"explain", "--bpffs", notBPFFS, "--pod-id", "web", "--uid", "1000", "--dst", "10.0.0.5:80"},
	} {
		out, err := runCLI(t, nil, args...)
		if err == nil {
			t.Errorf("%v succeeded: %q", args, out)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, "invalid --bpffs") || !strings.Contains(msg, "mount -t bpf") || strings.Contains(msg, "\n") {
			t.Errorf("%v: want one line naming --bpffs and the fix, got %q", args, msg)
		}
	}
}

// gc --help describes what status prints for a pod that went away.
func TestGCHelpMatchesStatus(t *testing.T) {
	out, err := runCLI(t, nil, "gc", "--help")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, detachedNote) || !strings.Contains(out, "defunct") || strings.Contains(out, "cgroup 0") {
		t.Errorf("gc --help does not describe divert status' output (%q):\n%s", detachedNote, out)
	}
}

// A second pod id below a captured cgroup is refused in one line naming --cgroup, the pod
// that holds it and the fix; the same id again is an update.
func TestAttachCapturedCgroup(t *testing.T) {
	pod := testpod.New(t)
	other := pod.Net.AddPod(t)
	opts := divertest.BPFFS(t)
	attach := func(id, cgroup, netns string) (string, error) {
		return runCLI(t, nil, "attach", "--pod-id", id, "--cgroup", cgroup, "--netns", netns, "--bpffs", opts.BPFFS)
	}
	if _, err := attach(pod.Name, pod.CgroupPath, pod.NetNSPath); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	child := divertest.ChildCgroup(t, pod.CgroupPath, "ctr")
	_, err := attach(other.Name, child, other.NetNSPath)
	if err == nil {
		loader.Detach(other.Name, opts)
		t.Fatal("a second pod id below a captured cgroup was attached")
	}
	msg := err.Error()
	for _, want := range []string{"--cgroup", "pod " + pod.Name + " already captures its ancestor " + pod.CgroupPath, "divert detach --pod-id " + pod.Name} {
		if strings.Contains(msg, "\n") || !strings.Contains(msg, want) {
			t.Errorf("want one line with %q, got %q", want, msg)
		}
	}
	divertest.AssertNothingAttached(t, other, loader.Options{BPFFS: t.TempDir()})
	if _, err := attach(pod.Name, pod.CgroupPath, pod.NetNSPath); err != nil {
		t.Errorf("re-attaching the same pod id must update: %v", err)
	}
}

// iptables apply in a netns that divert's eBPF captures is refused, naming the pod and
// the fix, and writes no rules.
func TestIptablesApplyRefusesEBPFPod(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	if err := loader.Attach(context.Background(), lp, divertest.Config(t), opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	_, err := runCLI(t, nil, "iptables", "apply", "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS)
	if err == nil {
		iptables.Cleanup(context.Background(), pod.NetNSPath)
		t.Fatal("iptables apply over eBPF capture succeeded")
	}
	for _, want := range []string{"--netns", "pod " + pod.Name, "divert detach --pod-id " + pod.Name} {
		if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, want) {
			t.Errorf("want one line with %q, got %q", want, msg)
		}
	}
	if held, err := iptables.Installed(context.Background(), pod.NetNSPath); err != nil || len(held) != 0 {
		t.Errorf("refused apply wrote rules: %v %v", held, err)
	}
	// Once detached, the rules go in.
	if err := loader.Detach(pod.Name, opts); err != nil {
		t.Fatal(err)
	}
	if _, err := runCLI(t, nil, "iptables", "apply", "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS); err != nil {
		t.Fatal(err)
	}
	if err := iptables.Cleanup(context.Background(), pod.NetNSPath); err != nil {
		t.Fatal(err)
	}
}

// A pod captured by the iptables fallback is listed by status (text and JSON) from its
// marker alone; detach removes the marker.
func TestStatusListsFallback(t *testing.T) {
	opts := divertest.BPFFS(t)
	if err := loader.RecordFallback("pod-a", "this kernel lacks program type SkLookup: not supported", opts); err != nil {
		t.Fatal(err)
	}
	out, err := runCLI(t, nil, "status", "--bpffs", opts.BPFFS)
	if err != nil || !strings.Contains(out, "pod pod-a: iptables fallback: this kernel lacks program type SkLookup") {
		t.Errorf("status text: %v\n%s", err, out)
	}
	out, err = runCLI(t, nil, "status", "--bpffs", opts.BPFFS, "--pod-id", "pod-a", "-o", "json")
	var st []loader.PodStatus
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || len(st) != 1 || st[0].ID != "pod-a" || !strings.Contains(st[0].Fallback, "SkLookup") {
		t.Errorf("status json: %v\n%s", err, out)
	}
	if out, err = runCLI(t, nil, "detach", "--pod-id", "pod-a", "--bpffs", opts.BPFFS); err != nil || !strings.Contains(out, "removed the iptables fallback marker") {
		t.Errorf("detach: %v %q", err, out)
	}
	if f, err := loader.Fallbacks(opts); err != nil || len(f) != 0 {
		t.Errorf("markers after detach: %v %v", f, err)
	}
}

// attach, status (text and json), explain and detach, as a user runs them.
func TestAttachStatusDetach(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	pod.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)

	out, err := runCLI(t, nil, "attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS, "-o", "3306", "-x", "203.0.113.0/24")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	if !strings.Contains(out, "attached "+pod.Name) {
		t.Errorf("attach output: %q", out)
	}
	dst := netip.AddrPortFrom(pod.Net.Addrs[0], 80)
	if res := pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: dst})[0]; len(res.Hops) != 1 || res.Hops[0].Orig != dst.String() {
		t.Fatalf("connection not captured after CLI attach: %+v", res)
	}

	out, err = runCLI(t, nil, "status", "--bpffs", opts.BPFFS, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st []loader.PodStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status json: %v\n%s", err, out)
	}
	if len(st) != 1 || st[0].ID != pod.Name || st[0].Counters["included-cidr"] != 1 || len(st[0].Programs) != 11 {
		t.Errorf("status: %+v", st)
	}
	if p := st[0].Policy; len(p.OutboundExcludePorts) != 1 || p.OutboundExcludePorts[0] != 3306 ||
		len(p.OutboundExcludeCIDRs) != 1 || p.OutboundExcludeCIDRs[0] != "203.0.113.0/24" ||
		len(p.LocalAddrs) != 1 || p.LocalAddrs[0] != pod.Addr {
		t.Errorf("status policy does not read back what was attached: %+v", p)
	}
	if out, err = runCLI(t, nil, "status", "--bpffs", opts.BPFFS); err != nil || !strings.Contains(out, "included-cidr") {
		t.Errorf("status text: %v\n%s", err, out)
	}

	if out, err = runCLI(t, nil, "detach", "--pod-id", pod.Name, "--bpffs", opts.BPFFS); err != nil || !strings.Contains(out, "detached") {
		t.Fatalf("detach: %v %q", err, out)
	}
	if out, err = runCLI(t, nil, "detach", "--pod-id", pod.Name, "--bpffs", opts.BPFFS); err != nil || !strings.Contains(out, "not attached") {
		t.Fatalf("second detach must succeed and say so: %v %q", err, out)
	}
	divertest.AssertNothingAttached(t, pod, opts)
}

// status and explain --pod-id show the DNS capture the kernel holds: the nameservers, or
// every destination's port 53.
func TestStatusExplainDNS(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	attach := func(extra ...string) {
		t.Helper()
		args := append([]string{"attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, extra...)
		if out, err := runCLI(t, nil, args...); err != nil {
			t.Fatalf("attach %v: %v\n%s", extra, err, out)
		}
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	status := func() (string, loader.PolicyStatus) {
		t.Helper()
		text, err := runCLI(t, nil, "status", "--bpffs", opts.BPFFS)
		if err != nil {
			t.Fatal(err)
		}
		out, err := runCLI(t, nil, "status", "--bpffs", opts.BPFFS, "-o", "json")
		var st []loader.PodStatus
		if err != nil || json.Unmarshal([]byte(out), &st) != nil || len(st) != 1 {
			t.Fatalf("status json: %v\n%s", err, out)
		}
		return text, st[0].Policy
	}
	explain := func(args ...string) string {
		t.Helper()
		out, err := runCLI(t, nil, append([]string{"explain", "--pod-id", pod.Name, "--bpffs", opts.BPFFS, "--uid", "1000"}, args...)...)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}

	attach()
	if text, p := status(); !strings.Contains(text, "dns      off") || p.DNSCapture {
		t.Errorf("DNS off: %+v\n%s", p, text)
	}
	attach("--redirect-dns", "--dns-servers", "10.96.0.11,10.96.0.10")
	ns := []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("10.96.0.11")}
	if text, p := status(); !strings.Contains(text, "dns      -> 127.0.0.1:15053  capture port 53 of nameservers [10.96.0.10 10.96.0.11]") ||
		!p.DNSCapture || p.DNSCaptureAll || !slices.Equal(p.DNSServers, ns) {
		t.Errorf("DNS by nameserver: %+v\n%s", p, text)
	}
	if out := explain("--udp", "--dst", "10.96.0.11:53"); !strings.Contains(out, "verdict: redirect-dns to port 15053 (dns-captured)") ||
		!strings.Contains(out, "iptables: -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.11/32 -j REDIRECT --to-port 15053") {
		t.Errorf("explain a query to a nameserver:\n%s", out)
	}
	if out := explain("--udp", "--dst", "10.96.0.12:53"); !strings.Contains(out, "verdict: pass (dns-not-captured)") {
		t.Errorf("explain a query to another address:\n%s", out)
	}
	if out := explain("--udp", "--dst", "10.96.0.10:123"); !strings.Contains(out, "UDP is only captured for DNS") {
		t.Errorf("explain UDP that is not DNS:\n%s", out)
	}
	attach("--redirect-dns", "--capture-all-dns")
	if text, p := status(); !strings.Contains(text, "capture port 53 of every destination") || !p.DNSCaptureAll || len(p.DNSServers) != 0 {
		t.Errorf("DNS capture-all: %+v\n%s", p, text)
	}
	if out := explain("--dst", "10.96.0.12:53"); !strings.Contains(out, "verdict: redirect-dns to port 15053 (dns-captured)") {
		t.Errorf("explain a TCP query with capture-all:\n%s", out)
	}
}

func TestExplain(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--uid", "1000", "--gid", "1000", "--dst", "10.0.0.5:80"}, "redirect-outbound to port 15001 (included-cidr)"},
		{[]string{"--uid", "1000", "--gid", "2000", "--dst", "10.0.0.5:80"}, "uid 1000, gid 2000,"},
		// --gid defaults to --uid, and says so.
		{[]string{"--uid", "1000", "--dst", "10.0.0.5:80"}, "uid 1000, gid 1000 (--gid not given: the uid)"},
		{[]string{"-g", "1000", "--uid", "1000", "--dst", "10.0.0.5:80"}, "pass (proxy-gid)"},
		// Native IPv6 is decided by the IPv6 rules when istio writes them: for an IPv6 pod,
		// or with --dual-stack for a pod with an IPv6 address. Not otherwise.
		{[]string{"--uid", "1000", "--dst", "[fd00::1]:80"}, "verdict: pass (none)"},
		{[]string{"--uid", "1000", "--dst", "[fd00::1]:80"}, "IPv6"},
		{[]string{"--uid", "1000", "--dst", "[fd00::1]:80", "--pod-ip", "10.1.1.1,fd00::5"}, "verdict: pass (none)"},
		{[]string{"--uid", "1000", "--dst", "[fd00::1]:80", "--pod-ip", "fd00::5"}, "redirect-outbound to port 15001 (included-cidr)"},
		{[]string{"--uid", "1000", "--dst", "[fd00::1]:80", "--pod-ip", "10.1.1.1,fd00::5", "--dual-stack"}, "iptables: -A ISTIO_OUTPUT -j ISTIO_REDIRECT"},
		{[]string{"--uid", "1337", "--dst", "[fd00::5]:8080", "--pod-ip", "fd00::5"}, "-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"},
		{[]string{"--uid", "1337", "--src", "::6", "--dst", "[fd00::5]:8080", "--pod-ip", "fd00::5"}, "pass (inbound-passthrough)"},
		{[]string{"--uid", "1000", "--dst", "[fd00:10::1]:80", "--pod-ip", "fd00::5", "-x", "10.0.0.0/8,fd00:10::/64"}, "iptables: -A ISTIO_OUTPUT -d fd00:10::/64 -j RETURN"},
		{[]string{"--uid", "1000", "--dst", "[::ffff:10.0.0.5]:80"}, "redirect-outbound to port 15001 (included-cidr)"},
		{[]string{"--uid", "1337", "--gid", "1337", "--dst", "10.0.0.5:80"}, "pass (proxy-uid)"},
		{[]string{"--uid", "1337", "--gid", "1337", "--dst", "10.1.1.1:8080", "--pod-ip", "10.1.1.1"}, "redirect-inbound to port 15006 (proxy-hairpin)"},
		// TPROXY: the proxy forwarding from a client's address (original_src) passes, where
		// istio's hairpin catches it; without the pod's addresses nothing is foreign.
		{[]string{"-m", "TPROXY", "--uid", "1337", "--src", "10.9.9.9", "--dst", "10.1.1.1:8080", "--pod-ip", "10.1.1.1"}, "pass (inbound-passthrough)"},
		{[]string{"-m", "TPROXY", "--uid", "1337", "--src", "10.9.9.9", "--dst", "10.1.1.1:8080", "--pod-ip", "10.1.1.1"}, "note:    divert differs from istio's rules here on purpose"},
		{[]string{"-m", "TPROXY", "--uid", "1337", "--src", "10.9.9.9", "--dst", "10.1.1.1:8080", "--pod-ip", "10.1.1.1"}, "iptables: -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"},
		{[]string{"--uid", "1337", "--src", "10.9.9.9", "--dst", "10.1.1.1:8080", "--pod-ip", "10.1.1.1"}, "redirect-inbound to port 15006 (proxy-hairpin)"},
		{[]string{"-m", "TPROXY", "--uid", "1337", "--src", "10.9.9.9", "--dst", "127.0.0.2:8080"}, "redirect-inbound to port 15006 (proxy-hairpin)"},
		{[]string{"-o", "80", "--uid", "1000", "--gid", "1000", "--dst", "10.0.0.5:80"}, "pass (excluded-outbound-port)"},
		{[]string{"--direction", "inbound", "--dst", "10.1.1.1:15021"}, "pass (inbound-excluded-port)"},
		{[]string{"-c", "net1", "--iface", "net1", "--uid", "1000", "--dst", "10.0.0.5:80"}, "iptables: -A OUTPUT -o net1 -j RETURN"},
		{[]string{"-c", "net1", "--iface", "net1", "--uid", "1000", "--dst", "10.0.0.5:80"}, "eBPF cannot decide this policy here, -c/--istio-exclude-interfaces net1"},
		{[]string{"-k", "net1", "--iface", "net1", "--direction", "inbound", "--dst", "192.0.2.1:80"}, "redirect-outbound to port 15001 (virtual-interface)"},
		{[]string{"--istio-outbound-owner-groups", "2000", "--uid", "1000", "--dst", "10.0.0.5:80"}, "iptables: -A ISTIO_OUTPUT -m owner ! --gid-owner 2000 -j RETURN"},
		// What the kernel fails whatever the rules is left to it, and explain says so.
		{[]string{"--uid", "1000", "--dst", "224.0.0.1:80"}, "reason:  none: the kernel fails this connect whatever the rules (ENETUNREACH"},
		{[]string{"--uid", "1337", "--dst", "127.255.255.255:8080"}, "verdict: pass (none)"},
		{[]string{"--uid", "1000", "--src", "127.0.0.6", "--dst", "10.0.0.5:80"}, "(EINVAL: a loopback source cannot leave the pod)"},
		{[]string{"--uid", "1000", "--dst", "[ff02::1]:80", "--pod-ip", "fd00::5"}, "the kernel fails this connect whatever the rules (ENETUNREACH: a broadcast or multicast route)"},
		{[]string{"--uid", "1000", "--dst", "[fe80::1]:80", "--pod-ip", "fd00::5"}, "(EINVAL: a link-local destination needs an interface)"},
		{[]string{"--uid", "1000", "--src", "::1", "--dst", "[fd00::9]:80", "--pod-ip", "fd00::5"}, "redirect-outbound to port 15001"},
	}
	for _, c := range cases {
		out, err := runCLI(t, nil, append([]string{"explain"}, c.args...)...)
		if err != nil || !strings.Contains(out, c.want) {
			t.Errorf("explain %v: %v\n%s\nwant %q", c.args, err, out, c.want)
		}
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--uid", "1000", "--dst", "nope"}, "--dst"},
		// Never silently uid 0: an outbound connection needs --uid.
		{[]string{"--dst", "10.0.0.5:80"}, "missing --uid"},
		{[]string{"--gid", "1000", "--dst", "10.0.0.5:80"}, "missing --uid"},
		{[]string{"--direction", "inbound", "--uid", "1000", "--dst", "10.1.1.1:80"}, "--uid/--gid"},
		{[]string{"--uid", "1000", "--dst", "10.0.0.5:80", "--pod-id", "no-such-pod", "--bpffs", divertest.BPFFS(t).BPFFS}, "invalid --pod-id \"no-such-pod\": not attached"},
		{[]string{"--uid", "1000", "--dst", "10.0.0.5:80", "--pod-id", "p", "-o", "80"}, "-o/--istio-local-outbound-ports-exclude with --pod-id"},
		{[]string{"--uid", "1000", "--dst", "10.0.0.5:80", "--pod-id", "p", "--pod-ip", "10.1.1.1"}, "--pod-ip with --pod-id"},
	} {
		_, err := runCLI(t, nil, append([]string{"explain"}, c.args...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("explain %v: want one line naming %q, got %v", c.args, c.want, err)
		}
	}
}

// explain --pod-id decides with the policy and addresses the kernel holds for the pod: its
// own address is local there (not a redirect), its -o and -x apply.
func TestExplainPodID(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	if _, err := runCLI(t, nil, "attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS,
		"-o", "3306", "-x", "203.0.113.0/24", "-u", "2000", "-m", "TPROXY"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	explain := func(args ...string) string {
		t.Helper()
		out, err := runCLI(t, nil, append([]string{"explain", "--pod-id", pod.Name, "--bpffs", opts.BPFFS}, args...)...)
		if err != nil {
			t.Fatalf("explain %v: %v", args, err)
		}
		return out
	}
	own := netip.AddrPortFrom(pod.Addr, 8080).String()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--uid", "1000", "--dst", own}, "pass (local-destination)"},
		{[]string{"--uid", "1000", "--dst", own}, "(local: loopback or the pod's own address)"},
		{[]string{"--uid", "2000", "--dst", own}, "redirect-inbound to port 15006 (proxy-hairpin)"},
		{[]string{"--uid", "1000", "--dst", "198.51.100.7:3306"}, "pass (excluded-outbound-port)"},
		{[]string{"--uid", "1000", "--dst", "203.0.113.9:80"}, "pass (excluded-cidr)"},
		{[]string{"--uid", "1000", "--dst", "198.51.100.7:80"}, "redirect-outbound to port 15001 (included-cidr)"},
		{[]string{"--uid", "2000", "--dst", "198.51.100.7:80"}, "pass (proxy-uid)"},
		// TPROXY mode, as pinned: the tunnel port is captured inbound.
		{[]string{"--direction", "inbound", "--dst", netip.AddrPortFrom(pod.Addr, 15008).String()}, "redirect-inbound to port 15006 (inbound-included-port)"},
		{[]string{"--uid", "1000", "--dst", own}, "policy:  pod " + pod.Name},
	} {
		if out := explain(c.args...); !strings.Contains(out, c.want) {
			t.Errorf("explain --pod-id %v:\n%s\nwant %q", c.args, out, c.want)
		}
	}
}

// A dual-stack pod is attached as istio-iptables would capture it: IPv4 only without
// --dual-stack ($ISTIO_DUAL_STACK), its IPv6 connections left alone as istio's rules leave
// them; both families with it, an update in place. divert status says which.
func TestAttachDualStackPod(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	opts := divertest.BPFFS(t)
	for _, c := range []struct {
		env  map[string]string
		ipv6 bool
		say  string
	}{
		{nil, false, "ipv6     not captured"},
		{map[string]string{"ISTIO_DUAL_STACK": "true"}, true, "ipv6     captured"},
	} {
		if _, err := runCLI(t, c.env, "attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS); err != nil {
			t.Fatalf("attach (env %v): %v", c.env, err)
		}
		st, err := loader.Status(pod.Name, opts)
		if err != nil || st.Policy.IPv6 != c.ipv6 {
			t.Errorf("env %v: IPv6 captured %v (%v), want %v", c.env, st.Policy.IPv6, err, c.ipv6)
		}
		if out, err := runCLI(t, nil, "status", "--pod-id", pod.Name, "--bpffs", opts.BPFFS); err != nil || !strings.Contains(out, c.say) {
			t.Errorf("env %v: status should say %q: %v\n%s", c.env, c.say, err, out)
		}
	}
	if _, err := runCLI(t, nil, "detach", "--pod-id", pod.Name, "--bpffs", opts.BPFFS); err != nil {
		t.Fatal(err)
	}
	divertest.AssertNothingAttached(t, pod, opts)
}

// The loader names the setting at fault ("invalid cgroup"); the CLI names its flag, also
// inside a wrapped error, and keeps the error's type for errors.As and errors.Is.
func TestInputErrorsNameTheFlag(t *testing.T) {
	ie := &loader.InputError{Field: "cgroup", Value: "/", Msg: loader.ErrCgroupRoot.Error() + "; pass the pod's own cgroup", Err: loader.ErrCgroupRoot}
	err := flagNamed(fmt.Errorf("pod p: %w", ie))
	want := `pod p: invalid --cgroup "/": ` + loader.ErrCgroupRoot.Error() + "; pass the pod's own cgroup"
	if err.Error() != want || !errors.Is(err, loader.ErrCgroupRoot) || !errors.As(err, new(*loader.InputError)) {
		t.Errorf("got %q, want %q wrapping the InputError", err, want)
	}
	if got := oneLine(ie); got != `invalid --cgroup "/": `+ie.Msg {
		t.Errorf("oneLine: %q", got)
	}
	if plain := errors.New("x"); flagNamed(plain) != plain {
		t.Error("an error without an InputError is changed")
	}
}
