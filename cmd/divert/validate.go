package main

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshdivert/divert/internal/validation"
	"github.com/meshdivert/divert/istioinit"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// validationExitCode is istio-iptables' exit code for a failed validation
// (constants.ValidationErrorCode), which Istio's tooling looks for.
const validationExitCode = 126

// validationError is a failed validation; ExitCode lets main exit as istio does.
type validationError struct{ err error }

func (v validationError) Error() string { return v.err.Error() }
func (v validationError) Unwrap() error { return v.err }

// ExitCode is the process exit code for this error.
func (v validationError) ExitCode() int { return validationExitCode }

func newValidateCmd(e env) *cobra.Command {
	var probePort uint16
	var timeout time.Duration
	var outbound string
	var appUID, appGID uint32
	cmd := &cobra.Command{
		Use:   "validate [istio-iptables flags] [--outbound IP:PORT]",
		Short: "Check from inside the pod that its connections are captured (istio-validation)",
		Long: `validate does what Istio's validation init container does, for either backend: it listens
on 127.0.0.1 at the proxy's ports (-p, -z), connects as the proxy uid (-u/-g) to
127.0.0.6:<--iptables-probe-port>, a destination in the pod itself that capture sends to the
inbound port, and requires that the connection lands there and that
getsockopt(SO_ORIGINAL_DST) reads 127.0.0.6:<probe port>. With --outbound it also connects
to that address as an application uid and requires it to land on the outbound port with its
original destination readable.

Run it in the pod's network namespace and cgroup (an init container after the one that
captures, before the proxy starts), as the proxy uid or as root (root switches one thread
to the uid for the probe connection). It exits non-zero (126, as istio-iptables) with a
diagnosis when capture does not work.`,
		Example: `  divert validate -p 15001 -z 15006 -u 1337
  divert validate --outbound 10.96.0.10:80`,
		Args: cobra.NoArgs,
	}
	fs := cmd.Flags()
	parse := policy.Flags(fs, policy.Default())
	fs.Uint16Var(&probePort, flagProbePort, 15002, "port dialled on 127.0.0.6")
	fs.DurationVar(&timeout, flagProbeTimeout, 5*time.Second, "how long to keep trying")
	fs.StringVar(&outbound, "outbound", "", "also check that a connection to IP:PORT, as --app-uid, is captured outbound (it leaves the pod if not)")
	fs.Uint32Var(&appUID, "app-uid", 65534, "uid (and gid, unless --app-gid) for --outbound")
	fs.Uint32Var(&appGID, "app-gid", 65534, "gid for --outbound")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := parse(e.getenv)
		if err != nil {
			return err
		}
		if probePort == 0 {
			return fmt.Errorf("invalid --%s 0: use a port between 1 and 65535", flagProbePort)
		}
		var dst netip.AddrPort
		if outbound != "" {
			if dst, err = netip.ParseAddrPort(outbound); err != nil || !dst.Addr().Is4() {
				return fmt.Errorf("invalid --outbound %q: use an IPv4 IP:PORT", outbound)
			}
			if !fs.Changed("app-gid") {
				appGID = appUID
			}
			if err := outboundCaptured(&cfg, dst, appUID, appGID); err != nil {
				return err
			}
		}
		return runValidation(cmd.Context(), e, &cfg, probePort, timeout, dst, appUID, appGID)
	}
	return cmd
}

// outboundCaptured refuses an --outbound check the policy itself would not capture: it
// would fail for the wrong reason.
func outboundCaptured(cfg *policy.Config, dst netip.AddrPort, uid, gid uint32) error {
	addrs, _ := loader.LocalAddrs(istioinit.OwnNetNS) // none known: only loopback is local
	v := cfg.Decide(policy.Conn{Direction: policy.Outbound, UID: uid, GID: gid, Dst: dst, DstLocal: policy.DstLocal(dst.Addr(), addrs)})
	if v.Action != policy.RedirectOutbound {
		return fmt.Errorf("invalid --outbound %s: the policy does not capture it for uid %d gid %d (%s); pick a destination and --app-uid it captures (see divert explain)", dst, uid, gid, v)
	}
	return nil
}

// runValidation runs the checks and prints one line each; a failure is a validationError.
func runValidation(ctx context.Context, e env, cfg *policy.Config, probePort uint16, timeout time.Duration, outbound netip.AddrPort, appUID, appGID uint32) error {
	checks, err := validation.Run(ctx, validation.Config{
		ProxyPort: cfg.ProxyPort, InboundCapturePort: cfg.InboundCapturePort,
		ProxyUID: cfg.ProxyUID, ProxyGID: cfg.ProxyGID,
		ProbePort: probePort, Timeout: timeout,
		Outbound: outbound, AppUID: appUID, AppGID: appGID,
	})
	fmt.Fprint(e.stdout, validation.Summary(checks))
	if err != nil {
		return validationError{err}
	}
	fmt.Fprintln(e.stdout, "validation passed: connections are captured")
	return nil
}
