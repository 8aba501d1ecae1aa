package istioinit

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// What a run did to the (stubbed) machine, in order.
type effects struct{ calls []string }

func (f *effects) add(format string, a ...any) { f.calls = append(f.calls, fmt.Sprintf(format, a...)) }

// recording turns stubWorld's effects into records; pins go to a directory that is no
// bpffs, so nothing is mounted and no marker can be written.
func recording(t *testing.T) (*Env, *effects, string) {
	w, f := stubWorld(t), &effects{}
	w.Attach = func(_ context.Context, pod loader.Pod, cfg *policy.Config, _ loader.Options) error {
		f.add("attach %s %s %s proxy %d", pod.ID, pod.Cgroup, pod.NetNS, cfg.ProxyPort)
		return nil
	}
	w.Detach = func(id string, _ loader.Options) error { f.add("detach %s", id); return nil }
	w.ApplyIptables = func(_ context.Context, netns string, b iptables.Backend, cfg *policy.Config) (iptables.Result, error) {
		f.add("iptables apply %s %s proxy %d", netns, b, cfg.ProxyPort)
		return iptables.Result{Backend: iptables.BackendNFT, Changed: true}, nil
	}
	w.CleanupIptables = func(_ context.Context, netns string, b iptables.Backend) error {
		f.add("iptables cleanup %s %s", netns, b)
		return nil
	}
	return w, f, t.TempDir()
}

// eBPF goes in first, then istio's rules an earlier run left come out of the pod's netns,
// backend by backend; nothing is detached.
func TestRunAttachReplacesIptables(t *testing.T) {
	w, f, bpffs := recording(t)
	w.InstalledIptables = func(context.Context, string) ([]iptables.Backend, error) {
		return []iptables.Backend{iptables.BackendNFT, iptables.BackendLegacy}, nil
	}
	out, errOut, err := runIstio(t, w, nil, append([]string{"--bpffs", bpffs}, injectorArgs...)...)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"attach 0b1c-2d /sys/fs/cgroup/kubepods/besteffort/pod0b1c-2d /proc/self/ns/net proxy 15001",
		"iptables cleanup /proc/self/ns/net nft", "iptables cleanup /proc/self/ns/net legacy",
	}
	if !slices.Equal(f.calls, want) {
		t.Errorf("effects %q, want %q", f.calls, want)
	}
	for _, s := range []string{"attached pod 0b1c-2d with eBPF", "removed istio's iptables rules (iptables-nft, iptables-legacy) from /proc/self/ns/net, replaced by eBPF"} {
		if !strings.Contains(out, s) {
			t.Errorf("stdout lacks %q:\n%s", s, out)
		}
	}
	if !strings.Contains(errOut, "mounting bpffs at "+bpffs) {
		t.Errorf("stderr should warn that the bpffs is mounted here: %q", errOut)
	}
}

// Attach is all-or-nothing across both backends: when istio's rules cannot be removed, a
// fresh eBPF attachment is undone, so the pod is not captured twice.
func TestRunAttachUndoneWhenIptablesStay(t *testing.T) {
	w, f, bpffs := recording(t)
	w.InstalledIptables = func(context.Context, string) ([]iptables.Backend, error) {
		return []iptables.Backend{iptables.BackendNFT}, nil
	}
	w.CleanupIptables = func(_ context.Context, netns string, b iptables.Backend) error {
		f.add("iptables cleanup %s %s", netns, b)
		return errors.New("iptables-nft-restore: line 3 failed")
	}
	_, _, err := runIstio(t, w, nil, append([]string{"--bpffs", bpffs}, injectorArgs...)...)
	if err == nil || !strings.Contains(err.Error(), "the eBPF attachment was undone") || !strings.Contains(err.Error(), "line 3 failed") {
		t.Fatalf("want the undone attachment and the cause, got %v", err)
	}
	want := []string{"attach 0b1c-2d /sys/fs/cgroup/kubepods/besteffort/pod0b1c-2d /proc/self/ns/net proxy 15001",
		"iptables cleanup /proc/self/ns/net nft", "detach 0b1c-2d"}
	if !slices.Equal(f.calls, want) {
		t.Errorf("effects %q, want %q", f.calls, want)
	}
}

// auto without eBPF writes istio's rules with the chosen backend and says why once; the
// marker for divert status cannot be written in a directory that is no bpffs, which is
// said (naming the flag) without undoing the capture.
func TestRunFallbackAppliesIptables(t *testing.T) {
	w, f, bpffs := recording(t)
	w.Probe = func(loader.Options) error {
		return fmt.Errorf("this kernel lacks program type SkLookup: %w", ebpf.ErrNotSupported)
	}
	out, errOut, err := runIstio(t, w, nil, append([]string{"--bpffs", bpffs}, injectorArgs...)...)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"iptables apply /proc/self/ns/net auto proxy 15001"}; !slices.Equal(f.calls, want) {
		t.Errorf("effects %q, want %q", f.calls, want)
	}
	if !strings.Contains(out, "iptables rules applied (iptables-nft, REDIRECT mode, IPv4): outbound TCP to port 15001, inbound to port 15006") {
		t.Errorf("stdout:\n%s", out)
	}
	lines := strings.Split(strings.TrimSpace(errOut), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "SkLookup") || !strings.Contains(lines[0], "using iptables") ||
		!strings.Contains(lines[1], "not recorded for divert status: invalid --bpffs") {
		t.Errorf("want the reason, then the unrecorded marker naming --bpffs, on stderr; got %q", errOut)
	}
}

// --cleanup-only removes both backends' traces of the pod, and reports each.
func TestRunCleanupOnly(t *testing.T) {
	w, f, bpffs := recording(t)
	o := []string{"--bpffs", bpffs}
	out, _, err := runCleanup(t, w, o...)
	if err != nil {
		t.Fatal(err)
	}
	// Nothing pinned: only the rules go.
	if want := []string{"iptables cleanup /proc/self/ns/net auto"}; !slices.Equal(f.calls, want) {
		t.Errorf("effects %q, want %q", f.calls, want)
	}
	if !strings.Contains(out, "pod 0b1c-2d had no eBPF attachment") || !strings.Contains(out, "istio iptables rules removed from /proc/self/ns/net") {
		t.Errorf("stdout:\n%s", out)
	}
	// Without iptables binaries there are no rules to remove.
	f.calls = nil
	w.IptablesAvailable = func() bool { return false }
	if out, _, err = runCleanup(t, w, o...); err != nil || len(f.calls) != 0 || !strings.Contains(out, "no iptables binaries here") {
		t.Errorf("without iptables: %v, effects %q, stdout:\n%s", err, f.calls, out)
	}
}

func runCleanup(t *testing.T, w *Env, args ...string) (string, string, error) {
	t.Helper()
	return runIstioWith(t, w, func(o *Options) { o.CleanupOnly = true }, nil, args...)
}
