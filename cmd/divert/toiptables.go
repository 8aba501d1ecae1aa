package main

import (
	"fmt"
	"net"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshdivert/divert/internal/clierr"
	"github.com/meshdivert/divert/node/handback"
)

func newToIptablesCmd(e env) *cobra.Command {
	var o handback.Options
	var cgroupRoot, agentSocket string
	cmd := &cobra.Command{
		Use:   "to-iptables [--pod-id ID]... [--dry-run] [--bpffs PATH] [--cgroup-root PATH]",
		Short: "Move this node's pods from divert to istio's iptables rules, without restarting them",
		Long: `to-iptables hands running pods back to istio-init's capture, live: for each pod attached on
this node (or each --pod-id), it applies istio-iptables' rules for the policy the pod's maps
hold, in the pod's network namespace, and only then detaches divert's programs, so every new
connection is captured throughout. A pod whose policy the maps cannot give back (TPROXY
mode, IPv6 addresses, an interrupted attach) is refused and stays captured by divert.

Run it on the node, as root in the host's PID namespace, after the node agent is gone (helm
uninstall): a running agent would capture its pods again. docs/install.md, "Migration".`,
		Args: cobra.NoArgs,
	}
	addBPFFSFlag(cmd.Flags(), &o.Loader)
	cmd.Flags().StringSliceVar(&o.IDs, "pod-id", nil, "only these pods (their pin directory names: the pod UID in node mode)")
	cmd.Flags().BoolVarP(&o.DryRun, "dry-run", "n", false, "only say what would be done")
	cmd.Flags().StringVar(&cgroupRoot, "cgroup-root", "", "where the host's /sys/fs/cgroup is mounted (default: the first cgroup2 mount)")
	cmd.Flags().StringVar(&agentSocket, "agent-socket", "/var/run/divert/cni.sock", "the node agent's socket (the chart's socketDir): refused while an agent answers there")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		// A running agent would attach its pods again at its next reconcile, and take
		// istio's rules out again: the move would not stick.
		if c, err := net.DialTimeout("unix", agentSocket, time.Second); err == nil {
			c.Close()
			return fmt.Errorf("the node agent answers on --agent-socket %s: it would capture the pods again; helm uninstall divert first", agentSocket)
		}
		var err error
		if o.CgroupRoot, err = clierr.CgroupRoot(cgroupRoot, "/proc/self/mountinfo"); err != nil {
			return err
		}
		verb := "moved"
		if o.DryRun {
			verb = "would move"
		}
		return handback.Run(cmd.Context(), o, func(r handback.Result) {
			switch {
			case r.Err != nil:
				fmt.Fprintf(e.stderr, "%s: refused: %v\n", r.ID, r.Err)
			case r.Skipped != "":
				fmt.Fprintf(e.stdout, "%s: skipped: %s\n", r.ID, r.Skipped)
			default:
				fmt.Fprintf(e.stdout, "%s: %s to iptables (netns %s%s)\n", r.ID, verb, r.NetNS, backendNote(r))
			}
		})
	}
	return cmd
}

func backendNote(r handback.Result) string {
	if r.Backend == "" {
		return ""
	}
	return ", iptables-" + r.Backend.String()
}
