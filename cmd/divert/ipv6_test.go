package main

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/test/testpod"
)

// iptables render prints both inputs when istio would capture IPv6: byte for byte istio's
// dry run for dual stack (shared/reference/dual-stack.rules), but for its "*nat" spelling.
func TestIptablesRenderIPv6(t *testing.T) {
	ref, err := os.ReadFile(filepath.Join("..", "..", "iptables", "testdata", "reference-dual-stack.rules"))
	if err != nil {
		t.Fatal(err)
	}
	want := strings.ReplaceAll(string(ref), "\n*nat\n", "\n* nat\n")
	for _, args := range [][]string{
		{"--dual-stack"},
		{"--dual-stack", "--pod-ip", "10.244.0.5,fd00:10:244::5"},
		{"--pod-ip", "fd00:10:244::5"},
	} {
		out, err := runCLI(t, nil, append([]string{"iptables", "render"}, args...)...)
		if err != nil || out != want {
			t.Errorf("render %v: %v\n%s\nwant\n%s", args, err, out, want)
		}
	}
	ipv4, err := runCLI(t, nil, "iptables", "render")
	if err != nil || strings.Contains(ipv4, "ip6tables") || strings.Contains(ipv4, "::") {
		t.Errorf("render: %v\n%s", err, ipv4)
	}
	for _, args := range [][]string{{"--pod-ip", "10.244.0.5,fd00:10:244::5"}, {"--dual-stack", "--pod-ip", "10.244.0.5"}} {
		if out, err := runCLI(t, nil, append([]string{"iptables", "render"}, args...)...); err != nil || out != ipv4 {
			t.Errorf("render %v: want IPv4 rules only, as istio: %v\n%s", args, err, out)
		}
	}
	if _, err := runCLI(t, nil, "iptables", "render", "--pod-ip", "fd00::/64"); err == nil || !strings.Contains(err.Error(), "--pod-ip") {
		t.Errorf("bad --pod-ip: %v", err)
	}
}

// iptables apply decides IPv6 from the namespace's addresses, writes both families and
// ::6, and cleanup removes both families' rules.
func TestIptablesApplyDualStackPod(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	ctx := context.Background()
	t.Cleanup(func() { _ = iptables.Cleanup(ctx, pod.NetNSPath) })
	ip6save := func() string {
		out, err := nsexec.CombinedOutput(pod.NetNSPath, exec.Command("ip6tables-save", "-t", "nat"))
		if err != nil {
			t.Fatalf("ip6tables-save: %v %s", err, out)
		}
		return string(out)
	}
	out, err := runCLI(t, nil, "iptables", "apply", "--netns", pod.NetNSPath)
	if err != nil || !strings.Contains(out, "REDIRECT mode, IPv4)") || strings.Contains(ip6save(), "ISTIO_") {
		t.Fatalf("apply without --dual-stack: %v %q; ip6tables:\n%s", err, out, ip6save())
	}
	out, err = runCLI(t, nil, "iptables", "apply", "--netns", pod.NetNSPath, "--dual-stack")
	if err != nil || !strings.Contains(out, "IPv4 and IPv6 (dual stack") {
		t.Fatalf("apply --dual-stack: %v %q", err, out)
	}
	if s := ip6save(); !strings.Contains(s, "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN") {
		t.Errorf("no IPv6 rules:\n%s", s)
	}
	addrs, err := iptables.PodAddrs(pod.NetNSPath)
	if err != nil || !slices.Contains(addrs, netip.MustParseAddr("::6")) {
		t.Errorf("::6 is not on lo: %v %v", addrs, err)
	}
	if _, err := runCLI(t, nil, "iptables", "cleanup", "--netns", pod.NetNSPath); err != nil {
		t.Fatal(err)
	}
	if held, err := iptables.Installed(ctx, pod.NetNSPath); err != nil || len(held) != 0 || strings.Contains(ip6save(), "ISTIO_") {
		t.Errorf("cleanup left rules: %v %v\n%s", held, err, ip6save())
	}
}
