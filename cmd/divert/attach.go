package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshdivert/divert/internal/clierr"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

func addBPFFSFlag(fs *pflag.FlagSet, opts *loader.Options) {
	fs.StringVar(&opts.BPFFS, "bpffs", loader.DefaultBPFFS, "bpffs mount under which pins live (<bpffs>/divert/<pod-id>/)")
}

func newAttachCmd(e env) *cobra.Command {
	var pod loader.Pod
	var opts loader.Options
	cmd := &cobra.Command{
		Use:   "attach --pod-id ID --cgroup PATH --netns PATH [policy flags]",
		Short: "Capture a pod's TCP connections for its proxy",
		Long: `attach loads divert's programs, attaches them to the pod's cgroup v2 directory (outbound:
connect4, connect6 for dual-stack sockets, sockops, getsockopt) and network namespace (inbound: sk_lookup) and pins them under
<bpffs>/divert/<pod-id>/, so capture outlives this command. It is all-or-nothing:
on any error nothing is left behind. On a pod that is already attached it updates the
policy in place and swaps in this build's programs without a gap in capture.`,
		Example: `  divert attach --pod-id demo --cgroup /sys/fs/cgroup/unified/demo --netns /run/netns/demo \
    -p 15001 -z 15006 -u 1337 -i '*' -x 10.96.0.0/12 -o 3306`,
		Args: cobra.NoArgs,
	}
	fs := cmd.Flags()
	fs.StringVar(&pod.ID, "pod-id", "", "name of the pod's pin directory (required)")
	fs.StringVar(&pod.Name, "pod-name", "", "the pod's Kubernetes namespace/name, shown by divert status (optional)")
	fs.StringVar(&pod.Cgroup, "cgroup", "", "the pod's cgroup v2 directory (required)")
	fs.StringVar(&pod.NetNS, "netns", "", "the pod's network namespace, e.g. /proc/<pid>/ns/net (required; read for the pod's own addresses)")
	addBPFFSFlag(fs, &opts)
	fs.BoolVar(&opts.NoOutbound, "no-outbound", false, "do not capture outbound connections (no connect4 program)")
	fs.BoolVar(&opts.NoInbound, "no-inbound", false, "do not capture inbound connections (no sk_lookup program; needs Linux 5.9+ otherwise)")
	parse := policy.Flags(fs, policy.Default())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := parse(e.getenv)
		if err != nil {
			return err
		}
		if pod.ID == "" {
			return errors.New("missing --pod-id: name the pod's pin directory, e.g. --pod-id default-web-1 (letters, digits, '_' and '-')")
		}
		if opts.NoInbound && opts.NoOutbound {
			return errors.New("nothing to attach: both directions are turned off; drop --no-inbound or --no-outbound")
		}
		// A netns that cannot be read is the loader's to name; one that can is decided as
		// istio-iptables would decide it in that pod.
		if addrs, err := iptables.PodAddrs(pod.NetNS); err == nil {
			cfg.DecideIPv6(addrs)
		}
		if err := loader.Attach(cmd.Context(), pod, &cfg, opts); err != nil {
			return clierr.IncompatibleHint(capturedHint(err, pod), pod.ID)
		}
		if !opts.NoOutbound {
			fmt.Fprintf(e.stdout, "attached %s: outbound TCP from cgroup %s now goes to port %d\n", pod.ID, pod.Cgroup, cfg.ProxyPort)
		}
		if !opts.NoInbound {
			fmt.Fprintf(e.stdout, "attached %s: inbound TCP to ports %s of netns %s now goes to the listener on port %d\n", pod.ID, cfg.InboundPortsText(), pod.NetNS, cfg.InboundCapturePort)
		}
		return nil
	}
	return cmd
}

func newDetachCmd(e env) *cobra.Command {
	var id string
	var opts loader.Options
	cmd := &cobra.Command{
		Use:   "detach --pod-id ID",
		Short: "Stop capturing a pod and remove everything attach made",
		Long:  "detach unpins the pod's links and maps; the programs detach with them. Detaching a pod that is not attached succeeds.",
		Args:  cobra.NoArgs,
	}
	cmd.Flags().StringVar(&id, "pod-id", "", "the pod to detach (required)")
	addBPFFSFlag(cmd.Flags(), &opts)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if id == "" {
			return errors.New("missing --pod-id: name the pod to detach (see divert status)")
		}
		// A pod captured by the iptables fallback has only a marker; it goes with the pod.
		if reasons, _ := loader.Fallbacks(opts); reasons[id] != "" {
			if err := loader.ClearFallback(id, opts); err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "removed the iptables fallback marker of %s (its rules stay: divert iptables cleanup)\n", id)
		}
		err := loader.Detach(id, opts)
		if errors.Is(err, loader.ErrNotAttached) {
			fmt.Fprintf(e.stdout, "%s was not attached\n", id)
			return nil
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "detached %s\n", id)
		return nil
	}
	return cmd
}

// capturedHint phrases the loader's refusal to attach where another pod is captured: the
// flag that points there, the pod that holds it, and how to free it.
func capturedHint(err error, pod loader.Pod) error {
	var ce *loader.CapturedError
	if !errors.As(err, &ce) {
		return err
	}
	flag, value := "cgroup", pod.Cgroup
	if ce.Relation == "netns" {
		flag, value = "netns", pod.NetNS
	}
	fix := "detach it first (divert detach --pod-id " + ce.Holder + ")"
	if ce.Holder == "" {
		fix = "detach the pod that holds it first (divert status --bpffs <its bpffs>)"
	}
	return fmt.Errorf("invalid --%s %q: %v; %s, or pass this pod's own %s", flag, value, ce, fix, flag)
}
