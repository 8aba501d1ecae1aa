package main

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/policy"
)

func newExplainCmd(e env) *cobra.Command {
	var uid, gid uint32
	var src, dst, direction string
	var podIPs []string
	cmd := &cobra.Command{
		Use:   "explain [policy flags] --uid U --gid G [--src IP] --dst IP:PORT [--pod-ip IP]",
		Short: "Say what divert (and istio-iptables) would do with one connection, and why",
		Long: `explain runs the reference model, the same rules in the same order as istio-iptables'
ISTIO_OUTPUT and ISTIO_INBOUND chains, on one connection and prints the verdict and the rule
that decided it. The eBPF programs count verdicts under the same reason names:
` + reasonNames(),
		Example: `  divert explain --uid 1000 --gid 1000 --dst 10.0.0.5:80
  divert explain -u 1337 --uid 1337 --gid 1337 --dst 10.1.1.1:8080 --pod-ip 10.1.1.1`,
		Args: cobra.NoArgs,
	}
	fs := cmd.Flags()
	fs.Uint32Var(&uid, "uid", 0, "uid of the process making the connection")
	fs.Uint32Var(&gid, "gid", 0, "gid of the process making the connection")
	fs.StringVar(&src, "src", "", "address the socket was bound to before connect (e.g. 127.0.0.6)")
	fs.StringVar(&dst, "dst", "", "destination IP:PORT (required)")
	fs.StringVar(&direction, "direction", "outbound", "outbound (made in the pod) or inbound (arriving from outside)")
	fs.StringSliceVar(&podIPs, "pod-ip", nil, "the pod's own addresses (destinations that are local, besides 127.0.0.0/8)")
	parse := policy.Flags(fs, policy.Default())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := parse(e.getenv)
		if err != nil {
			return err
		}
		conn := policy.Conn{UID: uid, GID: gid}
		switch direction {
		case "outbound":
		case "inbound":
			conn.Direction = policy.Inbound
		default:
			return fmt.Errorf("invalid --direction %q: use outbound or inbound", direction)
		}
		if conn.Dst, err = netip.ParseAddrPort(dst); err != nil {
			return fmt.Errorf("invalid --dst %q: use IP:PORT, like 10.0.0.5:80", dst)
		}
		if src != "" {
			if conn.Src, err = netip.ParseAddr(src); err != nil {
				return fmt.Errorf("invalid --src %q: use an IPv4 address, like 127.0.0.6", src)
			}
		}
		conn.DstLocal = conn.Dst.Addr().IsLoopback()
		for _, s := range podIPs {
			ip, err := netip.ParseAddr(strings.TrimSpace(s))
			if err != nil {
				return fmt.Errorf("invalid --pod-ip %q: use an IP address", s)
			}
			conn.DstLocal = conn.DstLocal || ip == conn.Dst.Addr()
		}
		v := cfg.Decide(conn)
		fmt.Fprintf(e.stdout, "verdict: %s\n", v)
		fmt.Fprintf(e.stdout, "reason:  %s (the eBPF counter of the same name counts it)\n", v.Reason)
		rule := iptables.MatchingRule(&cfg, conn)
		if rule == "" {
			rule = "(no rule matches: the chain falls through to the built-in chain's ACCEPT)"
		}
		fmt.Fprintf(e.stdout, "iptables: %s\n", rule)
		return nil
	}
	return cmd
}
