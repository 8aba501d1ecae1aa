package istioinit

import (
	"context"
	"errors"
	"fmt"

	"github.com/meshdivert/divert/internal/clierr"
	"github.com/meshdivert/divert/loader"
)

// cleanup removes this pod's eBPF pins and istio's iptables rules, whichever exist.
func (r *run) cleanup(ctx context.Context, dry bool) error {
	out := r.e.Stdout
	// A pod whose cgroup cannot be found cannot have been attached by this command either
	// (attach finds it the same way); its iptables rules are still removed.
	pod, _, perr := r.pod()
	if dry {
		if perr == nil {
			fmt.Fprintf(out, "would remove the eBPF pins of pod %s (%s)\n", pod.ID, loader.PinDir(r.lopts, pod.ID))
		}
		fmt.Fprintf(out, "would remove istio's iptables rules in %s\n", OwnNetNS)
		return nil
	}
	var errs []error
	switch {
	case perr != nil:
		fmt.Fprintf(out, "no eBPF attachment to remove: %s\n", clierr.OneLine(perr))
	case !pinned(r.lopts, pod.ID):
		fmt.Fprintf(out, "pod %s had no eBPF attachment\n", pod.ID)
	default:
		if err := r.e.Detach(pod.ID, r.lopts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
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
	if !r.e.IptablesAvailable() {
		fmt.Fprintln(out, "no iptables binaries here, so no iptables rules to remove")
	} else if err := r.e.CleanupIptables(ctx, OwnNetNS, r.backend); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Fprintf(out, "istio iptables rules removed from %s\n", OwnNetNS)
	}
	return errors.Join(errs...)
}
