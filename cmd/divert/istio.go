package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/cilium/ebpf"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// ownNetNS is the network namespace an init container shares with its pod.
const ownNetNS = "/proc/self/ns/net"

// forceNoEBPFEnv is a test hook: set to 1, the kernel probe fails, so auto mode's iptables
// fallback can be exercised on a kernel that supports everything.
const forceNoEBPFEnv = "DIVERT_TEST_FORCE_NO_EBPF"

// The outside world of istio-iptables mode, replaced by in-process tests.
var (
	probeEBPF   = loader.Probe
	checkPolicy = loader.CheckPolicy
	findPod     = func(f cgroups.Finder) (cgroups.Found, error) { return f.Find() }
	podAddrs    = net.InterfaceAddrs
	lookupUser  = user.Lookup
	// uidMapFile says whether this process is in a user namespace.
	uidMapFile = "/proc/self/uid_map"
)

// Flag names of istio-iptables' flags that are not policy (see policy.Flag* for those).
const (
	flagDryRun              = "dry-run"
	flagCleanupOnly         = "cleanup-only"
	flagSkipRuleApply       = "skip-rule-apply"
	flagRunValidation       = "run-validation"
	flagProbePort           = "iptables-probe-port"
	flagProbeTimeout        = "probe-timeout"
	flagReconcile           = "reconcile"
	flagForceApply          = "force-apply"
	flagNativeNftables      = "native-nftables"
	flagForceIptablesBinary = "force-iptables-binary"
	flagTraceLogging        = "iptables-trace-logging"
	flagCNIMode             = "cni-mode"
	flagNetworkNamespace    = "network-namespace"

	// divert's own.
	flagMode            = "mode"
	flagCgroupRoot      = "cgroup-root"
	flagCgroup          = "cgroup"
	flagPodID           = "pod-id"
	flagBPFFS           = "bpffs"
	flagIptablesBackend = "iptables-backend"
)

// support says what divert does with an istio-iptables setting.
type support int

const (
	// honoured: divert does what istio-iptables does with it. The zero value: the table
	// names only the settings that are refused.
	//lint:ignore U1000 named for the reader, used as the zero value
	honoured support = iota
	// rejected: anything but the "off" value is refused with a message naming the setting.
	rejected
)

// istioOpt is one istio-iptables flag (or environment-only setting) outside policy.
type istioOpt struct {
	name, short string
	// env are the variables istio reads for it; a later one overrides an earlier one, and
	// the flag overrides them all (istio's flag.BindEnv, then flag.AdditionalEnv).
	env     []string
	isBool  bool
	def     string // the default, which for a rejected setting is its only accepted value
	usage   string
	support support
	// why completes "not supported: ..." for rejected settings.
	why string
	// envOnly settings have no flag in istio-iptables.
	envOnly bool
}

// istioOpts are istio-iptables' non-policy settings (istio/istio tools/istio-iptables
// pkg/cmd/root.go and pkg/constants), each honoured or refused, never ignored.
var istioOpts = []istioOpt{
	{name: flagDryRun, short: "n", env: []string{"DRY_RUN"}, isBool: true, def: "false",
		usage: "print what would be attached (or the iptables rules) and change nothing"},
	{name: flagCleanupOnly, env: []string{"CLEANUP_ONLY"}, isBool: true, def: "false",
		usage: "remove this pod's eBPF pins and istio's iptables rules, and install nothing"},
	{name: flagSkipRuleApply, env: []string{"SKIP_RULE_APPLY"}, isBool: true, def: "false",
		usage: "install nothing (with --run-validation: only validate)"},
	{name: flagRunValidation, env: []string{"RUN_VALIDATION"}, isBool: true, def: "false",
		usage: "afterwards, check that connections are captured (what divert validate does)"},
	{name: flagProbePort, env: []string{"IPTABLES_PROBE_PORT"}, def: "15002",
		usage: "port dialled on 127.0.0.6 by --run-validation"},
	{name: flagProbeTimeout, env: []string{"PROBE_TIMEOUT"}, def: "5s",
		usage: "how long --run-validation tries"},
	{name: flagReconcile, env: []string{"RECONCILE"}, isBool: true, def: "false",
		usage: "accepted: divert always reconciles (an attached pod is updated in place, istio's chains are replaced)"},
	{name: flagForceApply, env: []string{"FORCE_APPLY"}, isBool: true, def: "false",
		usage: "accepted: divert always applies what differs from the wanted state"},
	{name: flagNativeNftables, env: []string{"NATIVE_NFTABLES"}, isBool: true, def: "false",
		usage: "accepted with eBPF (no rules are written); refused when the iptables backend would be used"},
	{name: flagForceIptablesBinary, env: []string{"FORCE_IPTABLES_BINARY"},
		usage: "iptables binary for the iptables backend: one whose name says nft or legacy"},
	{name: flagTraceLogging, env: []string{"IPTABLES_TRACE_LOGGING"}, isBool: true, def: "false", support: rejected,
		why: "divert writes no LOG rules; use divert status (per-reason counters) and divert explain"},
	{name: flagCNIMode, env: []string{"CNI_MODE"}, isBool: true, def: "false", support: rejected,
		why: "divert istio-iptables runs inside the pod (init container); istio-cni mode is not implemented"},
	{name: flagNetworkNamespace, env: []string{"NETWORK_NAMESPACE"}, support: rejected,
		why: "divert istio-iptables works on the network namespace it runs in; use divert attach --netns from outside the pod"},
	{name: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", env: []string{"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"}, def: "127.0.0.1/32", support: rejected, envOnly: true,
		why: "divert's loopback exemption is 127.0.0.1/32, as istio's default"},
}

// logFlags are istio's logging flags (the injector passes --log_output_level). They do
// not shape capture; divert prints one line per action whatever they say.
var logFlags = []string{"log_output_level", "log_caller", "log_stacktrace_level", "log_target", "log_rotate",
	"log_rotate_max_age", "log_rotate_max_size", "log_rotate_max_backups"}

// istioSettings are the resolved non-policy settings.
type istioSettings struct {
	values  map[string]string // effective value per istioOpt name
	sources map[string]string // where a non-default value came from, for messages
}

func (s istioSettings) bool(name string) bool { b, _ := strconv.ParseBool(s.values[name]); return b }

// resolveIstioOpts computes every istioOpt's value (flag > later env > earlier env >
// default) and refuses the unsupported ones that are not off.
func resolveIstioOpts(fs *pflag.FlagSet, getenv func(string) string) (istioSettings, error) {
	s := istioSettings{values: map[string]string{}, sources: map[string]string{}}
	for _, o := range istioOpts {
		v, src := o.def, ""
		for _, env := range o.env {
			ev := getenv(env)
			if ev == "" {
				continue
			}
			// Checked even when a flag overrides it: istio-iptables drops a bad value
			// silently, and a typo in a pod's environment should not go unnoticed.
			if _, err := strconv.ParseBool(strings.TrimSpace(ev)); o.isBool && err != nil {
				return s, fmt.Errorf("invalid $%s %q: use true or false", env, ev)
			}
			v, src = ev, "$"+env
		}
		if !o.envOnly && fs.Changed(o.name) {
			v, src = fs.Lookup(o.name).Value.String(), "--"+o.name
		}
		if o.isBool {
			b, err := strconv.ParseBool(strings.TrimSpace(v))
			if err != nil {
				return s, fmt.Errorf("invalid %s %q: use true or false", src, v)
			}
			v = strconv.FormatBool(b)
		}
		s.values[o.name], s.sources[o.name] = v, src
		if o.support == rejected && strings.TrimSpace(v) != o.def {
			flag := "--" + o.name
			if o.short != "" {
				flag = "-" + o.short + "/" + flag
			}
			shown := v // quoted when it would not read as one word (a newline, spaces)
			if strings.ContainsFunc(v, func(r rune) bool { return !unicode.IsGraphic(r) || unicode.IsSpace(r) }) {
				shown = strconv.Quote(v)
			}
			what := flag + "=" + shown
			switch {
			case o.envOnly:
				what = src + "=" + shown
			case strings.HasPrefix(src, "$"):
				what = src + "=" + shown + " (istio-iptables " + flag + ")"
			}
			return s, fmt.Errorf("%s is not supported: %s", what, o.why)
		}
	}
	return s, nil
}

// captureMode is --mode.
type captureMode string

const (
	modeAuto     captureMode = "auto"
	modeEBPF     captureMode = "ebpf"
	modeIptables captureMode = "iptables"
)

func parseMode(s string) (captureMode, error) {
	switch m := captureMode(strings.ToLower(strings.TrimSpace(s))); m {
	case modeAuto, modeEBPF, modeIptables:
		return m, nil
	}
	return "", fmt.Errorf("invalid --mode %q: use auto, ebpf or iptables", s)
}

// istioRun is one resolved invocation of istio-iptables mode.
type istioRun struct {
	e        env
	cfg      policy.Config
	opts     istioSettings
	mode     captureMode
	lopts    loader.Options
	backend  iptables.Backend
	podID    string       // --pod-id
	cgroupFl string       // --cgroup
	root     string       // --cgroup-root
	rootSrc  string       // where root came from, for messages: "--cgroup-root" or "$DIVERT_CGROUP_ROOT"
	ips      []netip.Addr // the pod's addresses (its interfaces')
}

func newIstioIptablesCmd(e env) *cobra.Command {
	var mode, backend string
	r := &istioRun{e: e}
	cmd := &cobra.Command{
		Use:   "istio-iptables [istio-iptables flags]",
		Short: "Drop-in for istio-init: capture this pod's TCP connections with eBPF (iptables as fallback)",
		Long: `istio-iptables takes istio-iptables' flags and environment variables, with istio-iptables'
defaults, and captures the pod it runs in (as the istio-init container does): it finds the
pod's cgroup v2 directory from its own (/proc/self/cgroup: the init container's cgroup is a
child of the pod's), attaches divert's programs there and to its network namespace, pins
them under <bpffs>/divert/<pod uid>/ and exits; capture outlives it. Invoked through a link
named istio-iptables it behaves the same.

--mode auto probes the kernel (program types, helpers, cgroup v2, bpffs, the verifier) and
falls back to istio's iptables rules, saying why in one line on stderr and recording it in
<bpffs>/divert_fallback/<pod uid> for divert status; only what the kernel or host lacks
falls back: a wrong setting or mount (--cgroup-root, $DIVERT_CGROUP_ROOT), a pod cgroup that
cannot be found or that another pod captures, fails. --mode ebpf fails with the reason
instead; --mode iptables always writes the rules. One backend per pod: eBPF removes istio's
rules, iptables detaches eBPF, and one iptables backend removes the other's chains.

IPv6 is captured as istio-iptables decides it from the pod's addresses: for an IPv6 pod,
and with --dual-stack ($ISTIO_DUAL_STACK) for a pod with any IPv6 address; eBPF mode does
not capture IPv6 yet, so such a pod uses iptables (--mode auto, recorded as a fallback).
So do the istio-iptables settings the eBPF programs cannot express (-c, -k, owner groups on
kernels before 6.2); --mode ebpf fails on them with the reason. The settings divert does
not implement at all (CNI mode, ...) are refused with a message naming them, never ignored.`,
		Example: `  divert istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020
  istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020 -n
  divert istio-iptables --cleanup-only`,
		Args: cobra.NoArgs,
	}
	fs := cmd.Flags()
	parsePolicy := policy.Flags(fs, policy.IstioIptablesDefaults())
	for _, o := range istioOpts {
		if o.envOnly {
			continue
		}
		usage := o.usage
		if o.support == rejected {
			usage = "refused unless " + o.def + ": " + o.why
			if o.def == "" {
				usage = "refused unless empty: " + o.why
			}
		}
		usage += " (env " + strings.Join(o.env, ", ") + ")"
		if o.isBool {
			def, _ := strconv.ParseBool(o.def)
			fs.BoolP(o.name, o.short, def, usage)
		} else {
			fs.StringP(o.name, o.short, o.def, usage)
		}
	}
	for _, name := range logFlags {
		fs.String(name, "", "istio's logging flag: accepted, no effect (divert prints one line per action)")
	}
	fs.Bool("log_as_json", false, "istio's logging flag: accepted, no effect")
	fs.StringVar(&mode, flagMode, "auto", "capture backend: auto (eBPF if the kernel can, else iptables), ebpf or iptables (env DIVERT_MODE)")
	fs.StringVar(&r.root, flagCgroupRoot, "", "where the host's cgroup v2 hierarchy (or its /sys/fs/cgroup) is mounted, if not at a cgroup2 mount listed in /proc/self/mountinfo (env DIVERT_CGROUP_ROOT)")
	fs.StringVar(&r.cgroupFl, flagCgroup, "", "the pod's cgroup v2 directory, instead of finding it from /proc/self/cgroup (env DIVERT_CGROUP)")
	fs.StringVar(&r.podID, flagPodID, "", "name of the pod's pin directory; default: the pod UID from its cgroup path (env DIVERT_POD_ID)")
	fs.StringVar(&r.lopts.BPFFS, flagBPFFS, loader.DefaultBPFFS, "bpffs mount to pin under; mounted there if missing (env DIVERT_BPFFS)")
	fs.StringVar(&backend, flagIptablesBackend, "auto", "iptables backend when iptables is used: auto, nft or legacy")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		fromEnv := func(flag, env string, v *string) {
			if !fs.Changed(flag) && e.getenv(env) != "" {
				*v = e.getenv(env)
			}
		}
		fromEnv(flagMode, "DIVERT_MODE", &mode)
		fromEnv(flagCgroupRoot, "DIVERT_CGROUP_ROOT", &r.root)
		r.rootSrc = "--" + flagCgroupRoot
		if !fs.Changed(flagCgroupRoot) && r.root != "" {
			r.rootSrc = "$DIVERT_CGROUP_ROOT"
		}
		fromEnv(flagCgroup, "DIVERT_CGROUP", &r.cgroupFl)
		fromEnv(flagPodID, "DIVERT_POD_ID", &r.podID)
		fromEnv(flagBPFFS, "DIVERT_BPFFS", &r.lopts.BPFFS)
		var err error
		if r.cfg, err = parsePolicy(e.getenv); err != nil {
			return err
		}
		if r.opts, err = resolveIstioOpts(fs, e.getenv); err != nil {
			return err
		}
		if r.mode, err = parseMode(mode); err != nil {
			return err
		}
		if r.backend, err = iptablesBackend(backend, r.opts); err != nil {
			return err
		}
		r.resolveProxyUser(fs)
		return r.run(cmd.Context())
	}
	return cmd
}

// iptablesBackend picks the iptables flavour from --iptables-backend, or from istio's
// --force-iptables-binary (iptables-nft, iptables-legacy, or a path to one).
func iptablesBackend(flag string, s istioSettings) (iptables.Backend, error) {
	b, err := iptables.ParseBackend(flag)
	if err != nil {
		return "", fmt.Errorf("invalid --%s: %w", flagIptablesBackend, err)
	}
	bin := filepath.Base(s.values[flagForceIptablesBinary])
	switch {
	case s.values[flagForceIptablesBinary] == "":
		return b, nil
	case strings.Contains(bin, "legacy"):
		return iptables.BackendLegacy, nil
	case strings.Contains(bin, "nft"):
		return iptables.BackendNFT, nil
	}
	return "", fmt.Errorf("invalid --%s %q: name iptables-nft or iptables-legacy (divert runs their -restore and -save)", flagForceIptablesBinary, s.values[flagForceIptablesBinary])
}

// resolveProxyUser applies istio's default for -u: the uid of $ENVOY_USER (istio-proxy)
// when that user exists, else 1337; -g follows -u unless given.
func (r *istioRun) resolveProxyUser(fs *pflag.FlagSet) {
	given := func(flag string) bool { return fs.Changed(flag) || r.e.getenv(policy.EnvVar(flag)) != "" }
	if given(policy.FlagProxyUID) {
		return
	}
	name := r.e.getenv("ENVOY_USER")
	if name == "" {
		name = "istio-proxy"
	}
	u, err := lookupUser(name)
	if err != nil {
		return
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return
	}
	r.cfg.ProxyUID = uint32(uid)
	if !given(policy.FlagProxyGID) {
		r.cfg.ProxyGID = uint32(uid)
	}
}

func (r *istioRun) run(ctx context.Context) error {
	out, dry := r.e.stdout, r.opts.bool(flagDryRun)
	if dry {
		fmt.Fprintln(out, "dry run: nothing is changed")
	}
	if err := r.decideFamilies(); err != nil {
		return err
	}
	if r.opts.bool(flagCleanupOnly) {
		return r.cleanup(ctx, dry)
	}
	if r.opts.bool(flagSkipRuleApply) {
		fmt.Fprintf(out, "--%s: nothing installed\n", flagSkipRuleApply)
	} else if err := r.apply(ctx, dry); err != nil {
		return err
	}
	if r.opts.bool(flagRunValidation) && !dry {
		return r.validate(ctx)
	}
	return nil
}

// pod finds the pod's cgroup and pin id (--cgroup and --pod-id override).
func (r *istioRun) pod() (loader.Pod, string, error) {
	pod := loader.Pod{ID: r.podID, Cgroup: r.cgroupFl, NetNS: ownNetNS}
	var err error
	if pod.Name, err = r.podName(); err != nil {
		return pod, "", err
	}
	if pod.Cgroup != "" {
		if pod.ID == "" {
			if pp, ok := cgroups.ParsePath(pod.Cgroup); ok {
				pod.ID = pp.UID
			}
		}
		if pod.ID == "" {
			return pod, "", fmt.Errorf("missing --%s: --%s %s names no pod UID (no kubepods pod<uid> directory)", flagPodID, flagCgroup, pod.Cgroup)
		}
		return pod, fmt.Sprintf("given by --%s", flagCgroup), nil
	}
	found, err := findPod(cgroups.Finder{Root: r.root})
	if err != nil {
		return pod, "", fmt.Errorf("%w; mount the host's /sys/fs/cgroup and pass --%s (or $DIVERT_CGROUP_ROOT), or pass --%s (or $DIVERT_CGROUP)", err, flagCgroupRoot, flagCgroup)
	}
	pod.Cgroup = found.Pod
	how := fmt.Sprintf("%s layout, this process in %s", found.Driver, found.Own)
	if pod.ID == "" {
		pod.ID = found.UID
	}
	if found.Driver == cgroups.Parent && r.podID == "" {
		return pod, "", fmt.Errorf("missing --%s: this process's cgroup %s is not in a Kubernetes pod layout (kubepods/.../pod<uid>); pass --%s to capture its parent %s, or --%s",
			flagPodID, found.Own, flagPodID, found.Pod, flagCgroup)
	}
	return pod, how, nil
}

// podName is the pod's namespace/name for divert status, from the downward API's
// $POD_NAMESPACE and $POD_NAME (divert's injector template sets them; Istio's istio-init
// has neither), or "" without them.
func (r *istioRun) podName() (string, error) {
	ns, name := r.e.getenv("POD_NAMESPACE"), r.e.getenv("POD_NAME")
	if ns == "" || name == "" {
		return "", nil
	}
	if err := loader.CheckPodName(ns + "/" + name); err != nil {
		return "", fmt.Errorf("invalid $POD_NAMESPACE/$POD_NAME %q: not a Kubernetes namespace and pod name; set them from the downward API (metadata.namespace, metadata.name), or unset them", ns+"/"+name)
	}
	return ns + "/" + name, nil
}

// ebpfUnavailable says why the eBPF backend cannot be used here, or nil.
func (r *istioRun) ebpfUnavailable() error {
	if v := r.e.getenv(forceNoEBPFEnv); v == "1" {
		return fmt.Errorf("turned off by $%s=1 (a test hook): %w", forceNoEBPFEnv, ebpf.ErrNotSupported)
	}
	if inUserNS() {
		return fmt.Errorf("this pod runs in a user namespace (hostUsers: false): the proxy's uid seen by eBPF is the host's, not -u %d: %w", r.cfg.ProxyUID, ebpf.ErrNotSupported)
	}
	if err := probeEBPF(r.lopts); err != nil {
		return err
	}
	// What the programs cannot express of the settings falls back like what the kernel lacks.
	return checkPolicy(&r.cfg)
}

// inUserNS reports whether this process is in a user namespace other than the initial one,
// whose uid map is the identity over all ids.
func inUserNS() bool {
	b, err := os.ReadFile(uidMapFile)
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	return !(len(f) == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
}

// checkCgroupRoot checks --cgroup-root ($DIVERT_CGROUP_ROOT): a missing or wrong path is
// the pod spec's mistake (a hostPath volume missing or mounted elsewhere) and fails; a
// host that has no cgroup v2 hierarchy at all (cgroup v1 only) is a reason for iptables
// and wraps ebpf.ErrNotSupported.
func (r *istioRun) checkCgroupRoot() error {
	if r.root == "" {
		return nil
	}
	if _, err := os.Stat(r.root); err != nil {
		return fmt.Errorf("invalid %s %q: %v; mount the host's /sys/fs/cgroup there (a hostPath volume), or unset it", r.rootSrc, r.root, unwrapPath(err))
	}
	_, err := cgroups.RootMount(r.root, "")
	switch {
	case err == nil:
		return nil
	case errors.Is(err, cgroups.ErrV1Only):
		return fmt.Errorf("%s %q: %v: %w", r.rootSrc, r.root, err, ebpf.ErrNotSupported)
	}
	return fmt.Errorf("invalid %s %q: %v; point it at where the host's /sys/fs/cgroup is mounted", r.rootSrc, r.root, err)
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// apply captures the pod with eBPF when it can (and may), else with iptables. It falls
// back to iptables only on the kernel's (or host's) verdict, ebpf.ErrNotSupported; a
// setting or a mount that is wrong fails, so a broken pod spec is fixed rather than
// silently captured another way.
func (r *istioRun) apply(ctx context.Context, dry bool) error {
	out := r.e.stdout
	var reason error
	if r.mode != modeIptables {
		reason = r.checkCgroupRoot()
		if reason == nil {
			reason = r.ebpfUnavailable()
		}
		if reason != nil && !errors.Is(reason, ebpf.ErrNotSupported) {
			return reason
		}
		var pod loader.Pod
		var how string
		if reason == nil {
			if pod, how, reason = r.pod(); reason != nil {
				return reason // the pod's cgroup must be found wherever the kernel can do eBPF
			}
		}
		if reason == nil {
			if dry {
				r.printEBPFPlan(out, pod, how)
				return nil
			}
			return r.attach(ctx, pod, how)
		}
		if r.mode == modeEBPF {
			return fmt.Errorf("--mode ebpf: eBPF capture is not possible here: %v", reason)
		}
		fmt.Fprintf(r.e.stderr, "divert: eBPF capture is not possible here (%s); using iptables\n", oneLine(reason))
	}
	if r.opts.bool(flagNativeNftables) {
		return fmt.Errorf("--%s is not supported with the iptables backend: divert writes iptables rules (iptables-nft or iptables-legacy), not native nftables", flagNativeNftables)
	}
	if dry {
		input := "iptables-restore --noflush input"
		if r.cfg.IPv6 {
			input = "iptables-restore and ip6tables-restore --noflush input, IPv6 for " + ipv6Why(&r.cfg)
		}
		fmt.Fprintf(out, "backend: iptables\nwould apply in network namespace %s (%s):\n", ownNetNS, input)
		_, err := io.WriteString(out, iptables.RenderAll(&r.cfg))
		return err
	}
	res, err := iptables.Options{Backend: r.backend}.Apply(ctx, ownNetNS, &r.cfg)
	if err != nil {
		if reason != nil {
			return fmt.Errorf("eBPF capture is not possible (%s), and iptables failed: %w", oneLine(reason), err)
		}
		return err
	}
	state := "applied"
	if !res.Changed {
		state = "already in place"
	}
	if reason != nil {
		r.recordFallback(reason)
	} else if id := r.knownPodID(); id != "" {
		loader.ClearFallback(id, r.lopts) // iptables by choice now, not for want of eBPF
	}
	fmt.Fprintf(out, "iptables rules %s (iptables-%s, %s mode, %s): outbound TCP to port %d, inbound to port %d\n",
		state, res.Backend, r.cfg.Mode, families(&r.cfg), r.cfg.ProxyPort, r.cfg.InboundCapturePort)
	for _, b := range res.Removed {
		fmt.Fprintf(out, "removed istio's iptables-%s rules, replaced by iptables-%s\n", b, res.Backend)
	}
	// The same pod captured by eBPF earlier (another mode, an older run) would capture twice.
	if id := r.knownPodID(); id != "" && pinned(r.lopts, id) {
		if err := loader.Detach(id, r.lopts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
			return err
		}
		fmt.Fprintf(out, "removed the eBPF attachment of pod %s, replaced by the rules\n", id)
	}
	return nil
}

// recordFallback leaves a marker that divert status (and the node) list, so a pod captured
// by iptables for want of eBPF is found without this container's logs. Not being able to
// write it does not undo the capture: it is said on stderr.
func (r *istioRun) recordFallback(reason error) {
	id := r.knownPodID()
	if id == "" {
		fmt.Fprintf(r.e.stderr, "divert: the iptables fallback is not recorded for divert status: no pod id (pass --%s)\n", flagPodID)
		return
	}
	if err := loader.RecordFallback(id, oneLine(reason), r.lopts); err != nil {
		fmt.Fprintf(r.e.stderr, "divert: the iptables fallback is not recorded for divert status: %s\n", oneLine(err))
		return
	}
	fmt.Fprintf(r.e.stdout, "recorded the fallback for divert status in %s\n", loader.FallbackPath(r.lopts, id))
}

// pinned reports whether the pod has a pin directory; checked before Detach, which would
// mount a bpffs at the default place just to find it empty.
func pinned(opts loader.Options, id string) bool {
	_, err := os.Stat(loader.PinDir(opts, id))
	return err == nil
}

// knownPodID is the pod id when it can be known without failing: --pod-id, or the UID
// from the cgroup path.
func (r *istioRun) knownPodID() string {
	if r.podID != "" {
		return r.podID
	}
	if pod, _, err := r.pod(); err == nil {
		return pod.ID
	}
	return ""
}

func (r *istioRun) attach(ctx context.Context, pod loader.Pod, how string) error {
	out := r.e.stdout
	// Attach replaces a pin directory left by an earlier sandbox of this pod (its network
	// namespace is gone, or its cgroup); it is only said here.
	gone, _ := loader.Defunct(pod.ID, r.lopts)
	if !loader.IsBPFFS(r.lopts.BPFFS) {
		// The loader mounts it. In a container that mount is only the host's if the
		// volume propagates it back (mountPropagation: Bidirectional); otherwise the pins,
		// and capture, end with this container.
		fmt.Fprintf(r.e.stderr, "divert: mounting bpffs at %s: in a container it must reach the host (hostPath volume with mountPropagation: Bidirectional), or capture ends when the container exits\n", r.lopts.BPFFS)
	}
	created := !pinned(r.lopts, pod.ID) || len(gone) > 0
	if err := loader.Attach(ctx, pod, &r.cfg, r.lopts); err != nil {
		var ce *loader.CapturedError
		if errors.As(err, &ce) && ce.Holder != "" {
			return fmt.Errorf("pod %s (cgroup %s, %s): %v; remove that attachment on the node first (divert detach --pod-id %s), or pass --%s", pod.ID, pod.Cgroup, how, ce, ce.Holder, flagCgroup)
		}
		if errors.As(err, &ce) {
			return fmt.Errorf("pod %s (cgroup %s, %s): %v; detach that pod first, or pass --%s", pod.ID, pod.Cgroup, how, ce, flagCgroup)
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w; use --mode iptables", err)
		}
		return incompatibleHint(err, pod.ID)
	}
	if len(gone) > 0 {
		fmt.Fprintf(out, "removed a stale attachment of pod %s (%s detached by the kernel)\n", pod.ID, strings.Join(gone, ", "))
	}
	fmt.Fprintf(out, "attached pod %s with eBPF: cgroup %s (%s), netns %s; outbound TCP to port %d, inbound %s to port %d; %s; pinned in %s\n",
		pod.ID, pod.Cgroup, how, pod.NetNS, r.cfg.ProxyPort, inboundPorts(&r.cfg), r.cfg.InboundCapturePort, families(&r.cfg), loader.PinDir(r.lopts, pod.ID))
	if r.cfg.DropInvalid {
		fmt.Fprintln(out, loader.DropInvalidNote)
	}
	// An earlier --mode iptables run (or istio-init) left istio's rules: they would capture
	// on top of eBPF. They go after eBPF is in, so capture has no gap; if they cannot go,
	// a fresh attachment is undone and the pod is left as it was.
	if err := loader.ClearFallback(pod.ID, r.lopts); err != nil {
		fmt.Fprintf(r.e.stderr, "divert: %s\n", oneLine(err))
	}
	removed, err := r.removeIptables(ctx)
	if err != nil {
		if !created {
			return fmt.Errorf("pod %s is captured by eBPF, but istio's iptables rules in its netns could not be removed (%v): remove them with divert istio-iptables --cleanup-only and run again", pod.ID, oneLine(err))
		}
		if derr := loader.Detach(pod.ID, r.lopts); derr != nil {
			err = errors.Join(err, derr)
		}
		return fmt.Errorf("istio's iptables rules in this pod's netns could not be removed, so the eBPF attachment was undone: %v", oneLine(err))
	}
	if len(removed) > 0 {
		fmt.Fprintf(out, "removed istio's iptables rules (%s) from %s, replaced by eBPF\n", strings.Join(removed, ", "), ownNetNS)
	}
	return nil
}

// removeIptables removes istio's rules from this pod's netns, returning the backends that
// held them.
func (r *istioRun) removeIptables(ctx context.Context) ([]string, error) {
	if !iptables.Available() {
		return nil, nil // nothing can have written them here
	}
	held, err := iptables.Installed(ctx, ownNetNS)
	if err != nil || len(held) == 0 {
		return nil, err
	}
	var names []string
	for _, b := range held {
		if err := (iptables.Options{Backend: b}).Cleanup(ctx, ownNetNS); err != nil {
			return nil, err
		}
		names = append(names, "iptables-"+b.String())
	}
	return names, nil
}

func (r *istioRun) printEBPFPlan(w io.Writer, pod loader.Pod, how string) {
	fmt.Fprintf(w, "backend: ebpf (the kernel supports divert's programs), %s\n", families(&r.cfg))
	fmt.Fprintf(w, "pod %s: cgroup %s (%s), netns %s\n", pod.ID, pod.Cgroup, how, pod.NetNS)
	dir := loader.PinDir(r.lopts, pod.ID)
	for _, p := range loader.Plan(r.lopts) {
		target := pod.Cgroup
		if p.Target == "netns" {
			target = pod.NetNS
		}
		fmt.Fprintf(w, "would attach %s (%s) to %s %s, pinned as %s\n", p.Name, p.Attach, p.Target, target, filepath.Join(dir, p.Pin))
	}
	if s := loader.ReturnPathPlan(&r.cfg, r.lopts); s != "" {
		fmt.Fprintf(w, "%s in netns %s\n", s, pod.NetNS)
	}
	fmt.Fprintf(w, "policy: %s\n", strings.Join(quoteArgs(r.cfg.Args()), " "))
	if r.cfg.DropInvalid {
		fmt.Fprintln(w, loader.DropInvalidNote)
	}
}

func quoteArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, "* ") {
			a = "'" + a + "'"
		}
		out[i] = a
	}
	return out
}

// cleanup removes this pod's eBPF pins and istio's iptables rules, whichever exist.
func (r *istioRun) cleanup(ctx context.Context, dry bool) error {
	out := r.e.stdout
	// A pod whose cgroup cannot be found cannot have been attached by this command either
	// (attach finds it the same way); its iptables rules are still removed.
	pod, _, perr := r.pod()
	if dry {
		if perr == nil {
			fmt.Fprintf(out, "would remove the eBPF pins of pod %s (%s)\n", pod.ID, loader.PinDir(r.lopts, pod.ID))
		}
		fmt.Fprintf(out, "would remove istio's iptables rules in %s\n", ownNetNS)
		return nil
	}
	var errs []error
	switch {
	case perr != nil:
		fmt.Fprintf(out, "no eBPF attachment to remove: %s\n", oneLine(perr))
	case !pinned(r.lopts, pod.ID):
		fmt.Fprintf(out, "pod %s had no eBPF attachment\n", pod.ID)
	default:
		if err := loader.Detach(pod.ID, r.lopts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
			errs = append(errs, err)
		} else {
			fmt.Fprintf(out, "detached pod %s (eBPF)\n", pod.ID)
		}
	}
	if perr == nil {
		if err := loader.ClearFallback(pod.ID, r.lopts); err != nil {
			errs = append(errs, err)
		}
	}
	if !iptables.Available() {
		fmt.Fprintln(out, "no iptables binaries here, so no iptables rules to remove")
	} else if err := (iptables.Options{Backend: r.backend}).Cleanup(ctx, ownNetNS); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Fprintf(out, "istio iptables rules removed from %s\n", ownNetNS)
	}
	return errors.Join(errs...)
}

func (r *istioRun) validate(ctx context.Context) error {
	port, err := strconv.ParseUint(r.opts.values[flagProbePort], 10, 16)
	if err != nil || port == 0 {
		return fmt.Errorf("invalid --%s %q: use a port between 1 and 65535", flagProbePort, r.opts.values[flagProbePort])
	}
	timeout, err := time.ParseDuration(r.opts.values[flagProbeTimeout])
	if err != nil || timeout <= 0 {
		return fmt.Errorf("invalid --%s %q: use a duration like 5s", flagProbeTimeout, r.opts.values[flagProbeTimeout])
	}
	return runValidation(ctx, r.e, &r.cfg, uint16(port), timeout, netip.AddrPort{}, 0, 0)
}

func oneLine(err error) string { return strings.ReplaceAll(flagNamed(err).Error(), "\n", " ") }
