package main

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// newIptablesCmd is the iptables backend: the same policy as the eBPF programs, as the
// rules istio-iptables would install. Output goes to the command's OutOrStdout.
func newIptablesCmd(e env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "iptables",
		Short: "Render, apply or remove istio-iptables' rules for the same policy flags",
		Long: `The iptables backend renders the policy flags as exactly the iptables-restore input
istio-iptables produces (IPv4 nat table; in TPROXY mode also the mangle table; with DNS
capture the raw table's conntrack zones too) and can
apply it to a pod's network namespace. It is the fallback where eBPF cannot be used and the
oracle the eBPF backend is compared with.

Policy flags are istio-iptables' flags (short and long) and environment variables;
interface exclusions and IPv6 rules are not rendered.`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(newIptablesRenderCmd(e), newIptablesApplyCmd(e), newIptablesCleanupCmd(e))
	return cmd
}

func newIptablesRenderCmd(e env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "render [policy flags]",
		Short: "Print the iptables-restore input istio-iptables would use (dry run)",
		Long: `render prints, without touching anything, what istio-iptables hands to
"iptables-restore --noflush" for these flags, rule for rule and in istio's order. When
istio would capture the pod's IPv6 too, it prints that input and then what istio hands to
"ip6tables-restore --noflush", each headed by a comment line naming its tool, as istio's
dry run does. istio decides IPv6 from the pod's addresses (--pod-ip): an IPv6-only pod, or
with --dual-stack any pod with an IPv6 address; without --pod-ip, --dual-stack alone
renders both.`,
		Example: `  divert iptables render -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020
  divert iptables render -m TPROXY -b 8080 | iptables-restore --test
  divert iptables render --pod-ip 10.244.0.5,fd00:10:244::5 --dual-stack -x 10.96.0.0/12,fd00:10:96::/112`,
		Args: cobra.NoArgs,
	}
	var podIPs []string
	cmd.Flags().StringSliceVar(&podIPs, "pod-ip", nil, "the pod's addresses, from which istio-iptables decides whether to write IPv6 rules")
	parse := policy.Flags(cmd.Flags(), policy.Default())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := parse(e.getenv)
		if err != nil {
			return err
		}
		if len(podIPs) == 0 {
			cfg.IPv6 = cfg.DualStack
		} else {
			addrs, err := parsePodIPs(podIPs)
			if err != nil {
				return err
			}
			cfg.DecideIPv6(addrs)
		}
		_, err = fmt.Fprint(cmd.OutOrStdout(), iptables.RenderAll(&cfg))
		return err
	}
	return cmd
}

func newIptablesApplyCmd(e env) *cobra.Command {
	var netnsPath, backend string
	cmd := &cobra.Command{
		Use:   "apply --netns PATH [--backend auto|nft|legacy] [policy flags]",
		Short: "Install the rules (and TPROXY's policy route) in a pod's network namespace",
		Long: `apply installs the rules render prints in the network namespace at --netns, in one atomic
"iptables-restore --noflush" run. Applying again with the same flags changes nothing;
with other flags it replaces istio's chains and rules and leaves everything else alone.
In TPROXY mode it also adds "ip rule fwmark <-t> lookup <-r>" and
"ip route add local 0.0.0.0/0 dev lo table <-r>". The namespace's addresses decide IPv6
as istio-iptables decides it there (an IPv6-only pod, or --dual-stack and any IPv6
address); the IPv6 rules then go in with ip6tables-restore, with istio's ::6 on lo (and
in TPROXY mode the IPv6 policy route).

--backend auto uses the iptables backend that already holds ISTIO_ chains there, else
iptables-nft when it works, else iptables-legacy. istio's chains in the other backend are
removed once the rules are in (a pod's rules live in one backend). A network namespace
that divert's eBPF programs capture is refused: detach that pod first.`,
		Example: `  divert iptables apply --netns /run/netns/web-1 -u 1337 -i '*' -b '*' -d 15090,15021,15020
  divert iptables apply --netns /proc/4242/ns/net --backend legacy -m TPROXY`,
		Args: cobra.NoArgs,
	}
	var lopts loader.Options
	addIptablesNetnsFlags(cmd.Flags(), &netnsPath, &backend)
	addBPFFSFlag(cmd.Flags(), &lopts)
	parse := policy.Flags(cmd.Flags(), policy.Default())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := parse(e.getenv)
		if err != nil {
			return err
		}
		opts, err := iptablesOptions(netnsPath, backend)
		if err != nil {
			return err
		}
		// Rules on top of divert's eBPF capture would capture twice (and the proxy would
		// read 127.0.0.1:15001 as the original destination).
		if ce, err := loader.NetNSCaptured(netnsPath, lopts); err != nil {
			return fmt.Errorf("invalid --netns %q: %w", netnsPath, err)
		} else if ce != nil {
			holder, fix := "pod "+ce.Holder, "divert detach --pod-id "+ce.Holder
			if ce.Holder == "" {
				holder, fix = fmt.Sprintf("a pod pinned outside --bpffs %s (program %d)", lopts.BPFFS, ce.ProgramID), "divert detach with that pod's --bpffs"
			}
			return fmt.Errorf("invalid --netns %q: divert's eBPF programs capture it (%s); detach first (%s), or use divert istio-iptables --mode iptables in the pod, which replaces them", netnsPath, holder, fix)
		}
		addrs, err := iptables.PodAddrs(netnsPath)
		if err != nil {
			return fmt.Errorf("invalid --netns %q: %w", netnsPath, err)
		}
		cfg.DecideIPv6(addrs) // as istio-iptables would, run in that netns
		res, err := opts.Apply(cmd.Context(), netnsPath, &cfg)
		if err != nil {
			return err
		}
		state := "applied"
		if !res.Changed {
			state = "already in place"
		}
		route := ""
		if res.TProxyRoute {
			route = fmt.Sprintf(", policy route fwmark %d lookup %d", cfg.TProxyMark, cfg.TProxyRouteTable)
		}
		out := cmd.OutOrStdout()
		families := "IPv4"
		if res.IPv6 {
			families = "IPv4 and IPv6 (" + cfg.IPv6Why() + ")"
		}
		if _, err := fmt.Fprintf(out, "iptables rules %s in %s (iptables-%s, %s mode, %s%s)\n",
			state, netnsPath, res.Backend, cfg.Mode, families, route); err != nil {
			return err
		}
		for _, b := range res.Removed {
			fmt.Fprintf(out, "removed istio's iptables-%s rules from %s (replaced by iptables-%s)\n", b, netnsPath, res.Backend)
		}
		return nil
	}
	return cmd
}

func newIptablesCleanupCmd(e env) *cobra.Command {
	var netnsPath, backend string
	cmd := &cobra.Command{
		Use:   "cleanup --netns PATH [--backend auto|nft|legacy]",
		Short: "Remove istio's chains, the jumps into them and TPROXY's policy route",
		Long: `cleanup removes every ISTIO_ chain, the rules in the kernel's chains that jump into them,
istio's TPROXY mark rules and its TPROXY policy routes from the network namespace at
--netns, IPv4 and IPv6; other rules are left alone, and so is ::6 on lo, as istio leaves it. Cleaning a clean namespace is a no-op. With --backend
auto it cleans both iptables-nft and iptables-legacy. Policy flags are accepted, so an
istio-iptables command line works, but not needed: whatever istio installed is removed.`,
		Example: `  divert iptables cleanup --netns /run/netns/web-1`,
		Args:    cobra.NoArgs,
	}
	addIptablesNetnsFlags(cmd.Flags(), &netnsPath, &backend)
	parse := policy.Flags(cmd.Flags(), policy.Default())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if _, err := parse(e.getenv); err != nil {
			return err
		}
		opts, err := iptablesOptions(netnsPath, backend)
		if err != nil {
			return err
		}
		if err := opts.Cleanup(cmd.Context(), netnsPath); err != nil {
			return err
		}
		_, err = fmt.Fprintf(cmd.OutOrStdout(), "istio iptables rules removed from %s\n", netnsPath)
		return err
	}
	return cmd
}

func addIptablesNetnsFlags(fs *pflag.FlagSet, netnsPath, backend *string) {
	fs.StringVar(netnsPath, "netns", "", "the pod's network namespace, e.g. /run/netns/NAME or /proc/PID/ns/net (required)")
	fs.StringVar(backend, "backend", "auto", "iptables backend: auto, nft or legacy")
}

func iptablesOptions(netnsPath, backend string) (iptables.Options, error) {
	if netnsPath == "" {
		return iptables.Options{}, errors.New("missing --netns: give the pod's network namespace, e.g. --netns /proc/<pid>/ns/net")
	}
	b, err := iptables.ParseBackend(backend)
	if err != nil {
		return iptables.Options{}, fmt.Errorf("invalid --backend: %w", err)
	}
	return iptables.Options{Backend: b}, nil
}

// parsePodIPs reads --pod-ip values.
func parsePodIPs(ss []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range ss {
		ip, err := netip.ParseAddr(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("invalid --pod-ip %q: use an IP address, like 10.244.0.5 or fd00:10:244::5", s)
		}
		out = append(out, ip)
	}
	return out, nil
}
