package main

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

func newExplainCmd(e env) *cobra.Command {
	var uid, gid uint32
	var src, dst, direction, podID, iface string
	var udp bool
	var podIPs []string
	var opts loader.Options
	cmd := &cobra.Command{
		Use:   "explain [policy flags | --pod-id ID] --uid U [--gid G] [--src IP] --dst IP:PORT [--pod-ip IP]",
		Short: "Say what divert (and istio-iptables) would do with one connection, and why",
		Long: `explain runs the reference model, the same rules in the same order as istio-iptables'
ISTIO_OUTPUT and ISTIO_INBOUND chains, on one connection and prints the verdict and the rule
that decided it. The policy is the policy flags given (istio-iptables' defaults otherwise),
or with --pod-id the policy and addresses an attached pod holds in the kernel (its pins).
An outbound connection needs the uid of the process that makes it (--uid); its gid is the
uid unless --gid says otherwise, and the connection line says which. The eBPF programs count
verdicts under the same reason names:
` + reasonNames(),
		Example: `  divert explain --uid 1000 --dst 10.0.0.5:80
  divert explain --pod-id demo --uid 1000 --dst 10.0.0.5:3306
  divert explain -u 1337 --uid 1337 --gid 1337 --dst 10.1.1.1:8080 --pod-ip 10.1.1.1`,
		Args: cobra.NoArgs,
	}
	fs := cmd.Flags()
	fs.Uint32Var(&uid, "uid", 0, "uid of the process making an outbound connection (required for outbound)")
	fs.Uint32Var(&gid, "gid", 0, "gid of the process making an outbound connection (default: --uid)")
	fs.StringVar(&src, "src", "", "address the socket was bound to before connect (e.g. 127.0.0.6)")
	fs.StringVar(&dst, "dst", "", "destination IP:PORT (required)")
	fs.StringVar(&direction, "direction", "outbound", "outbound (made in the pod) or inbound (arriving from outside)")
	fs.StringVar(&iface, "iface", "", "the interface the connection arrives on (inbound) or routing sends it out by (outbound), for -c and -k")
	fs.BoolVar(&udp, "udp", false, "a UDP datagram (or UDP connect) rather than a TCP connection: only DNS queries are ever captured")
	fs.StringSliceVar(&podIPs, "pod-ip", nil, "the pod's own addresses (destinations that are local, besides 127.0.0.0/8 and ::1); they decide IPv6 capture as istio-iptables does")
	fs.StringVar(&podID, "pod-id", "", "explain against this attached pod: its policy and addresses as pinned in bpffs (instead of policy flags and --pod-ip)")
	addBPFFSFlag(fs, &opts)
	own := map[string]bool{}
	fs.VisitAll(func(f *pflag.Flag) { own[f.Name] = true })
	parse := policy.Flags(fs, policy.Default())
	var policyFlags []string // registered by policy.Flags
	fs.VisitAll(func(f *pflag.Flag) {
		if !own[f.Name] {
			policyFlags = append(policyFlags, f.Name)
		}
	})
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		conn := policy.Conn{Iface: iface}
		if udp {
			conn.Proto = policy.UDP
		}
		switch direction {
		case "outbound":
		case "inbound":
			conn.Direction = policy.Inbound
		default:
			return fmt.Errorf("invalid --direction %q: use outbound or inbound", direction)
		}
		var err error
		if conn.Dst, err = netip.ParseAddrPort(dst); err != nil {
			return fmt.Errorf("invalid --dst %q: use IP:PORT, like 10.0.0.5:80", dst)
		}
		if src != "" {
			if conn.Src, err = netip.ParseAddr(src); err != nil {
				return fmt.Errorf("invalid --src %q: use an IP address, like 127.0.0.6 or ::6", src)
			}
		}
		ids := ""
		switch {
		case conn.Direction == policy.Inbound && (fs.Changed("uid") || fs.Changed("gid")):
			return errors.New("--uid/--gid apply to outbound connections only: drop them, or use --direction outbound")
		case conn.Direction == policy.Outbound && !fs.Changed("uid"):
			return errors.New("missing --uid: give the uid of the process making the connection, e.g. --uid 1000 (an app) or --uid 1337 (the proxy)")
		case conn.Direction == policy.Outbound:
			conn.UID, conn.GID = uid, uid
			ids = fmt.Sprintf(", uid %d, gid %d (--gid not given: the uid)", uid, uid)
			if fs.Changed("gid") {
				conn.GID = gid
				ids = fmt.Sprintf(", uid %d, gid %d", uid, gid)
			}
		}

		var cfg policy.Config
		var local []netip.Addr
		var from string
		if podID != "" {
			for _, name := range policyFlags {
				if fs.Changed(name) || e.getenv(policy.EnvVar(name)) != "" {
					flag := "--" + name
					if sh := fs.Lookup(name).Shorthand; sh != "" {
						flag = "-" + sh + "/" + flag
					}
					return fmt.Errorf("%s with --pod-id: the pod's policy is read from its pins; drop it (and $%s), or drop --pod-id to explain a policy given by flags",
						flag, policy.EnvVar(name))
				}
			}
			if len(podIPs) > 0 {
				return errors.New("--pod-ip with --pod-id: the pod's addresses are read from its pins; drop --pod-ip")
			}
			if cfg, local, err = pinnedPolicy(podID, opts); err != nil {
				return err
			}
			from = fmt.Sprintf("pod %s as the kernel holds it (%s)", podID, loader.PinDir(opts, podID))
		} else {
			if cfg, err = parse(e.getenv); err != nil {
				return err
			}
			if local, err = parsePodIPs(podIPs); err != nil {
				return err
			}
			cfg.DecideIPv6(local)
			from = "flags (istio-iptables' defaults for those not given)"
		}
		conn.DstLocal = policy.DstLocal(conn.Dst.Addr(), local)
		// Without the pod's addresses a bound source cannot be told from the pod's own.
		conn.SrcForeign = len(local) > 0 && policy.SrcForeign(conn.Src, local)

		where := "not local"
		if conn.DstLocal {
			where = "local: loopback or the pod's own address"
		}
		fmt.Fprintf(e.stdout, "connection: %s %s%s, to %s (%s)\n", direction, conn.Proto, ids, conn.Dst, where)
		fmt.Fprintf(e.stdout, "policy:  %s: %s; pod addresses %v\n", from, cfg.CommandLine(), local)
		v := cfg.Decide(conn)
		fmt.Fprintf(e.stdout, "verdict: %s\n", v)
		if v.Reason == policy.ReasonNone && conn.Proto == policy.UDP {
			fmt.Fprintln(e.stdout, "reason:  none: UDP is only captured for DNS (port 53, with --redirect-dns); no program decides it and no counter counts it")
			return nil
		}
		if refusal := conn.Refused(); v.Reason == policy.ReasonNone && refusal != policy.NotRefused {
			fmt.Fprintf(e.stdout, "reason:  none: the kernel fails this connect whatever the rules (%s), before any packet: divert leaves it to the kernel, as iptables never sees it; no counter counts it\n", refusal)
			return nil
		}
		if v.Reason == policy.ReasonNone {
			fmt.Fprintln(e.stdout, "reason:  none: an IPv6 destination, and istio-iptables writes no IPv6 rules for this pod (it does for an IPv6-only pod, or with --dual-stack for one with an IPv6 address: see --pod-ip); no program decides it and no counter counts it")
			fmt.Fprintln(e.stdout, "iptables: none: no ip6tables rules")
			return nil
		}
		if err := loader.CheckPolicy(&cfg); err != nil {
			fmt.Fprintf(e.stdout, "reason:  %s (eBPF cannot decide this policy here, %s; istio-iptables mode uses iptables)\n", v.Reason, oneLine(err))
		} else {
			fmt.Fprintf(e.stdout, "reason:  %s (the eBPF counter of the same name counts it)\n", v.Reason)
		}
		rule := iptables.MatchingRule(&cfg, conn)
		if rule == "" {
			rule = "(no rule matches: the chain falls through to the built-in chain's ACCEPT)"
		}
		fmt.Fprintf(e.stdout, "iptables: %s\n", rule)
		if conn.SrcForeign && conn.DstLocal && cfg.TransparentPassthrough() {
			fmt.Fprintln(e.stdout, "note:    divert differs from istio's rules here on purpose: a TPROXY proxy forwarding from the client's address passes (istio's nat hairpin catches it and it never completes; docs/semantics.md, TPROXY mode)")
		}
		return nil
	}
	return cmd
}

// pinnedPolicy reads an attached pod's policy and addresses back from its pins: what the
// kernel decides with, which may differ from any command line.
func pinnedPolicy(id string, opts loader.Options) (policy.Config, []netip.Addr, error) {
	st, err := loader.Status(id, opts)
	if errors.Is(err, loader.ErrNotAttached) {
		return policy.Config{}, nil, fmt.Errorf("invalid --pod-id %q: not attached under %s (see divert status --bpffs %s)", id, loader.PinDir(opts, id), opts.BPFFS)
	}
	if err != nil {
		return policy.Config{}, nil, err
	}
	m, err := loader.OpenMaps(id, opts)
	if err != nil {
		return policy.Config{}, nil, err
	}
	defer loader.CloseMaps(m)
	cfg, local, err := maps.ReadPolicy(m)
	if err != nil {
		return policy.Config{}, nil, fmt.Errorf("pod %s: %w", id, err)
	}
	if st.Inert {
		// As divert status shows an inert pod: its exclusions are the disarmed state (every
		// port), not its policy.
		cfg.OutboundExcludePorts, cfg.InboundExcludePorts = nil, nil
	}
	return cfg, local, nil
}
