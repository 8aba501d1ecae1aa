// Package istioinit is what `divert istio-iptables` does once its flags are parsed: the
// drop-in for istio-init, run inside the pod it captures. It decides the families, then
// applies (eBPF when the kernel can and the settings allow, else istio's iptables rules,
// recording the fallback), cleans up, and validates, one backend per pod.
//
// Everything it touches of the machine is in Env (cloudflare/tubular's env pattern), so
// tests replace the kernel, the cgroup layout, the loader and iptables without privilege.
// Its messages are istio-iptables mode's: they name that command's flags (the Flag*
// constants, shared with cmd/divert, which defines them).
package istioinit

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// OwnNetNS is the network namespace an init container shares with its pod.
const OwnNetNS = "/proc/self/ns/net"

// ForceNoEBPFEnv is a test hook: set to 1, the kernel probe fails, so auto mode's iptables
// fallback can be exercised on a kernel that supports everything.
const ForceNoEBPFEnv = "DIVERT_TEST_FORCE_NO_EBPF"

// Names of the flags of `divert istio-iptables` that messages here name.
const (
	FlagSkipRuleApply  = "skip-rule-apply"
	FlagNativeNftables = "native-nftables"
	FlagCgroupRoot     = "cgroup-root"
	FlagCgroup         = "cgroup"
	FlagPodID          = "pod-id"
)

// Mode is --mode: which backend captures.
type Mode string

const (
	// ModeAuto uses eBPF when the kernel can and the settings allow, else iptables.
	ModeAuto Mode = "auto"
	// ModeEBPF uses eBPF or fails with the reason it cannot.
	ModeEBPF Mode = "ebpf"
	// ModeIptables always writes istio's rules.
	ModeIptables Mode = "iptables"
)

// Options are one resolved invocation of istio-iptables mode.
type Options struct {
	// Policy is the capture policy, from istio-iptables' flags and environment.
	Policy policy.Config
	// Mode picks the backend.
	Mode Mode
	// Loader says where pins live (its BPFFS is mounted if missing).
	Loader loader.Options
	// Backend is the iptables flavour when iptables is used.
	Backend iptables.Backend
	// PodID names the pod's pin directory; "" takes the pod UID from its cgroup path.
	PodID string
	// Cgroup is the pod's cgroup v2 directory; "" finds it from this process's cgroup.
	Cgroup string
	// CgroupRoot is where the host's cgroup v2 hierarchy (or its /sys/fs/cgroup) is
	// mounted, when not found in mountinfo; CgroupRootSource names where it came from, for
	// messages ("--cgroup-root" or "$DIVERT_CGROUP_ROOT").
	CgroupRoot, CgroupRootSource string
	// DryRun prints what would be done and changes nothing.
	DryRun bool
	// CleanupOnly removes the pod's eBPF pins and istio's rules, and installs nothing.
	CleanupOnly bool
	// SkipRuleApply installs nothing (Validate still runs).
	SkipRuleApply bool
	// NativeNftables is istio's --native-nftables: fine with eBPF, refused with iptables.
	NativeNftables bool
	// Validate, if set, runs after the capture is in place (not in a dry run); its error
	// is Run's.
	Validate func(context.Context, *policy.Config) error
}

// Env is what istio-iptables mode touches of the outside world: Host's, or in tests
// stubs of any of it. Every field is used.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
	// Probe says why the kernel cannot run divert's programs, or nil (loader.Probe).
	Probe func(loader.Options) error
	// CheckPolicy says what of a policy the programs cannot express here (loader.CheckPolicy).
	CheckPolicy func(*policy.Config) error
	// FindPod finds the pod's cgroup from this process's own.
	FindPod func(cgroups.Finder) (cgroups.Found, error)
	// PodAddrs are the addresses of the pod's interfaces (this netns's).
	PodAddrs func() ([]net.Addr, error)
	// InUserNS reports whether this process is in a user namespace other than the
	// initial one.
	InUserNS func() bool
	// Attach and Detach are the loader's.
	Attach func(context.Context, loader.Pod, *policy.Config, loader.Options) error
	Detach func(id string, opts loader.Options) error
	// IptablesAvailable reports whether any iptables-restore is installed.
	IptablesAvailable func() bool
	// ApplyIptables writes istio's rules for cfg into the netns with backend b.
	ApplyIptables func(ctx context.Context, netns string, b iptables.Backend, cfg *policy.Config) (iptables.Result, error)
	// InstalledIptables lists the backends holding istio's rules in the netns.
	InstalledIptables func(ctx context.Context, netns string) ([]iptables.Backend, error)
	// CleanupIptables removes istio's rules from the netns (backend b, or all with auto).
	CleanupIptables func(ctx context.Context, netns string, b iptables.Backend) error
}

// Host is this machine, as `divert istio-iptables` uses it.
func Host() Env {
	return Env{
		Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv,
		Probe: loader.Probe, CheckPolicy: loader.CheckPolicy,
		FindPod:  func(f cgroups.Finder) (cgroups.Found, error) { return f.Find() },
		PodAddrs: net.InterfaceAddrs,
		InUserNS: func() bool { return InUserNS("/proc/self/uid_map") },
		Attach:   loader.Attach, Detach: loader.Detach,
		IptablesAvailable: iptables.Available,
		ApplyIptables: func(ctx context.Context, netns string, b iptables.Backend, cfg *policy.Config) (iptables.Result, error) {
			return iptables.Options{Backend: b}.Apply(ctx, netns, cfg)
		},
		InstalledIptables: iptables.Installed,
		CleanupIptables: func(ctx context.Context, netns string, b iptables.Backend) error {
			return iptables.Options{Backend: b}.Cleanup(ctx, netns)
		},
	}
}

// InUserNS reports whether the process whose uid_map is at uidMap is in a user namespace
// other than the initial one, whose uid map is the identity over all ids.
func InUserNS(uidMap string) bool {
	b, err := os.ReadFile(uidMap)
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	return !(len(f) == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
}

// run is one invocation; its fields are Options' under the names the steps use.
type run struct {
	e        Env
	o        Options
	cfg      policy.Config // its families are decided here
	mode     Mode
	lopts    loader.Options
	backend  iptables.Backend
	podID    string       // --pod-id
	cgroupFl string       // --cgroup
	root     string       // --cgroup-root
	rootSrc  string       // where root came from, for messages: "--cgroup-root" or "$DIVERT_CGROUP_ROOT"
	ips      []netip.Addr // the pod's addresses (its interfaces')
}

// Run does what `divert istio-iptables` does with o: decide the families, then clean up
// (CleanupOnly) or capture (unless SkipRuleApply), then validate.
func Run(ctx context.Context, e Env, o Options) error {
	r := &run{e: e, o: o, cfg: o.Policy, mode: o.Mode, lopts: o.Loader, backend: o.Backend,
		podID: o.PodID, cgroupFl: o.Cgroup, root: o.CgroupRoot, rootSrc: o.CgroupRootSource}
	out, dry := r.e.Stdout, o.DryRun
	if dry {
		fmt.Fprintln(out, "dry run: nothing is changed")
	}
	if err := r.decideFamilies(); err != nil {
		return err
	}
	if o.CleanupOnly {
		return r.cleanup(ctx, dry)
	}
	if o.SkipRuleApply {
		fmt.Fprintf(out, "--%s: nothing installed\n", FlagSkipRuleApply)
	} else if err := r.apply(ctx, dry); err != nil {
		return err
	}
	if o.Validate != nil && !dry {
		return o.Validate(ctx, &r.cfg)
	}
	return nil
}
