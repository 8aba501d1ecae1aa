package istioinit

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/internal/clierr"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
)

// apply captures the pod with eBPF when it can (and may), else with iptables. It falls
// back to iptables only on the kernel's (or host's) verdict, ebpf.ErrNotSupported; a
// setting or a mount that is wrong fails, so a broken pod spec is fixed rather than
// silently captured another way.
func (r *run) apply(ctx context.Context, dry bool) error {
	out := r.e.Stdout
	var reason error
	if r.mode != ModeIptables {
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
		if r.mode == ModeEBPF {
			return fmt.Errorf("--mode ebpf: eBPF capture is not possible here: %v", reason)
		}
		fmt.Fprintf(r.e.Stderr, "divert: eBPF capture is not possible here (%s); using iptables\n", clierr.OneLine(reason))
	}
	if r.o.NativeNftables {
		return fmt.Errorf("--%s is not supported with the iptables backend: divert writes iptables rules (iptables-nft or iptables-legacy), not native nftables", FlagNativeNftables)
	}
	if dry {
		input := "iptables-restore --noflush input"
		if r.cfg.IPv6 {
			input = "iptables-restore and ip6tables-restore --noflush input, IPv6 for " + r.cfg.IPv6Why()
		}
		fmt.Fprintf(out, "backend: iptables\nwould apply in network namespace %s (%s):\n", OwnNetNS, input)
		_, err := io.WriteString(out, iptables.RenderAll(&r.cfg))
		return err
	}
	res, err := r.e.ApplyIptables(ctx, OwnNetNS, r.backend, &r.cfg)
	if err != nil {
		if reason != nil {
			return fmt.Errorf("eBPF capture is not possible (%s), and iptables failed: %w", clierr.OneLine(reason), err)
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
		state, res.Backend, r.cfg.Mode, r.cfg.FamiliesText(), r.cfg.ProxyPort, r.cfg.InboundCapturePort)
	for _, b := range res.Removed {
		fmt.Fprintf(out, "removed istio's iptables-%s rules, replaced by iptables-%s\n", b, res.Backend)
	}
	// The same pod captured by eBPF earlier (another mode, an older run) would capture twice.
	if id := r.knownPodID(); id != "" && pinned(r.lopts, id) {
		if err := r.e.Detach(id, r.lopts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
			return err
		}
		fmt.Fprintf(out, "removed the eBPF attachment of pod %s, replaced by the rules\n", id)
	}
	return nil
}

// recordFallback leaves a marker that divert status (and the node) list, so a pod captured
// by iptables for want of eBPF is found without this container's logs. Not being able to
// write it does not undo the capture: it is said on stderr.
func (r *run) recordFallback(reason error) {
	id := r.knownPodID()
	if id == "" {
		fmt.Fprintf(r.e.Stderr, "divert: the iptables fallback is not recorded for divert status: no pod id (pass --%s)\n", FlagPodID)
		return
	}
	if err := loader.RecordFallback(id, clierr.OneLine(reason), r.lopts); err != nil {
		fmt.Fprintf(r.e.Stderr, "divert: the iptables fallback is not recorded for divert status: %s\n", clierr.OneLine(err))
		return
	}
	fmt.Fprintf(r.e.Stdout, "recorded the fallback for divert status in %s\n", loader.FallbackPath(r.lopts, id))
}
