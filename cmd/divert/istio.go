package main

import (
	"context"
	"fmt"
	"net/netip"
	"os/user"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/istioinit"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// Flag names of istio-iptables' flags that are not policy (see policy.Flag* for those).
const (
	flagDryRun              = "dry-run"
	flagCleanupOnly         = "cleanup-only"
	flagSkipRuleApply       = istioinit.FlagSkipRuleApply
	flagRunValidation       = "run-validation"
	flagProbePort           = "iptables-probe-port"
	flagProbeTimeout        = "probe-timeout"
	flagReconcile           = "reconcile"
	flagForceApply          = "force-apply"
	flagNativeNftables      = istioinit.FlagNativeNftables
	flagForceIptablesBinary = "force-iptables-binary"
	flagTraceLogging        = "iptables-trace-logging"
	flagCNIMode             = "cni-mode"
	flagNetworkNamespace    = "network-namespace"

	// divert's own.
	flagMode            = "mode"
	flagCgroupRoot      = istioinit.FlagCgroupRoot
	flagCgroup          = istioinit.FlagCgroup
	flagPodID           = istioinit.FlagPodID
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

func parseMode(s string) (istioinit.Mode, error) {
	switch m := istioinit.Mode(strings.ToLower(strings.TrimSpace(s))); m {
	case istioinit.ModeAuto, istioinit.ModeEBPF, istioinit.ModeIptables:
		return m, nil
	}
	return "", fmt.Errorf("invalid --mode %q: use auto, ebpf or iptables", s)
}

// istioRun is one invocation of istio-iptables mode, resolved from its flags.
type istioRun struct {
	e    env
	o    istioinit.Options
	opts istioSettings
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
and with --dual-stack ($ISTIO_DUAL_STACK) for a pod with any IPv6 address, by either
backend. The istio-iptables settings the eBPF programs cannot express (-c, -k, owner groups
on kernels before 6.2) use iptables (--mode auto, recorded as a fallback); --mode ebpf
fails on them with the reason. The settings divert does
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
	fs.StringVar(&r.o.CgroupRoot, flagCgroupRoot, "", "where the host's cgroup v2 hierarchy (or its /sys/fs/cgroup) is mounted, if not at a cgroup2 mount listed in /proc/self/mountinfo (env DIVERT_CGROUP_ROOT)")
	fs.StringVar(&r.o.Cgroup, flagCgroup, "", "the pod's cgroup v2 directory, instead of finding it from /proc/self/cgroup (env DIVERT_CGROUP)")
	fs.StringVar(&r.o.PodID, flagPodID, "", "name of the pod's pin directory; default: the pod UID from its cgroup path (env DIVERT_POD_ID)")
	fs.StringVar(&r.o.Loader.BPFFS, flagBPFFS, loader.DefaultBPFFS, "bpffs mount to pin under; mounted there if missing (env DIVERT_BPFFS)")
	fs.StringVar(&backend, flagIptablesBackend, "auto", "iptables backend when iptables is used: auto, nft or legacy")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		fromEnv := func(flag, env string, v *string) {
			if !fs.Changed(flag) && e.getenv(env) != "" {
				*v = e.getenv(env)
			}
		}
		fromEnv(flagMode, "DIVERT_MODE", &mode)
		fromEnv(flagCgroupRoot, "DIVERT_CGROUP_ROOT", &r.o.CgroupRoot)
		r.o.CgroupRootSource = "--" + flagCgroupRoot
		if !fs.Changed(flagCgroupRoot) && r.o.CgroupRoot != "" {
			r.o.CgroupRootSource = "$DIVERT_CGROUP_ROOT"
		}
		fromEnv(flagCgroup, "DIVERT_CGROUP", &r.o.Cgroup)
		fromEnv(flagPodID, "DIVERT_POD_ID", &r.o.PodID)
		fromEnv(flagBPFFS, "DIVERT_BPFFS", &r.o.Loader.BPFFS)
		var err error
		if r.o.Policy, err = parsePolicy(e.getenv); err != nil {
			return err
		}
		if r.opts, err = resolveIstioOpts(fs, e.getenv); err != nil {
			return err
		}
		if r.o.Mode, err = parseMode(mode); err != nil {
			return err
		}
		if r.o.Backend, err = iptablesBackend(backend, r.opts); err != nil {
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
	if s.values[flagForceIptablesBinary] == "" {
		return b, nil
	}
	if b, ok := iptables.BackendOfBinary(s.values[flagForceIptablesBinary]); ok {
		return b, nil
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
	lookup := r.e.lookupUser
	if lookup == nil {
		lookup = user.Lookup
	}
	u, err := lookup(name)
	if err != nil {
		return
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return
	}
	r.o.Policy.ProxyUID = uint32(uid)
	if !given(policy.FlagProxyGID) {
		r.o.Policy.ProxyGID = uint32(uid)
	}
}

func (r *istioRun) run(ctx context.Context) error {
	r.o.DryRun = r.opts.bool(flagDryRun)
	r.o.CleanupOnly = r.opts.bool(flagCleanupOnly)
	r.o.SkipRuleApply = r.opts.bool(flagSkipRuleApply)
	r.o.NativeNftables = r.opts.bool(flagNativeNftables)
	if r.opts.bool(flagRunValidation) {
		r.o.Validate = r.validate
	}
	ie := istioinit.Host()
	if r.e.istio != nil {
		ie = *r.e.istio
	}
	ie.Stdout, ie.Stderr, ie.Getenv = r.e.stdout, r.e.stderr, r.e.getenv
	return istioinit.Run(ctx, ie, r.o)
}

// validate is --run-validation, run once the capture is in place; its settings are read
// only then.
func (r *istioRun) validate(ctx context.Context, cfg *policy.Config) error {
	port, err := strconv.ParseUint(r.opts.values[flagProbePort], 10, 16)
	if err != nil || port == 0 {
		return fmt.Errorf("invalid --%s %q: use a port between 1 and 65535", flagProbePort, r.opts.values[flagProbePort])
	}
	timeout, err := time.ParseDuration(r.opts.values[flagProbeTimeout])
	if err != nil || timeout <= 0 {
		return fmt.Errorf("invalid --%s %q: use a duration like 5s", flagProbeTimeout, r.opts.values[flagProbeTimeout])
	}
	return runValidation(ctx, r.e, cfg, uint16(port), timeout, netip.AddrPort{}, 0, 0)
}
