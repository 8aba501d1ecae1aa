package istioinit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/internal/clierr"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
)

func (r *run) attach(ctx context.Context, pod loader.Pod, how string) error {
	out := r.e.Stdout
	// Attach replaces a pin directory left by an earlier sandbox of this pod (its network
	// namespace is gone, or its cgroup); it is only said here.
	gone, _ := loader.Defunct(pod.ID, r.lopts)
	if !loader.IsBPFFS(r.lopts.BPFFS) {
		// The loader mounts it. In a container that mount is only the host's if the
		// volume propagates it back (mountPropagation: Bidirectional); otherwise the pins,
		// and capture, end with this container.
		fmt.Fprintf(r.e.Stderr, "divert: mounting bpffs at %s: in a container it must reach the host (hostPath volume with mountPropagation: Bidirectional), or capture ends when the container exits\n", r.lopts.BPFFS)
	}
	created := !pinned(r.lopts, pod.ID) || len(gone) > 0
	// The search for istio's rules an earlier run left (an iptables-save per backend and
	// family, each a process in the netns) runs while eBPF attaches, which is mostly the
	// kernel's work in this process: the run waited for both in turn. Nothing writes rules
	// in between.
	held := r.findIptables(ctx)
	if err := r.e.Attach(ctx, pod, &r.cfg, r.lopts); err != nil {
		held() // not needed; waited for, so nothing outlives the run
		var ce *loader.CapturedError
		if errors.As(err, &ce) && ce.Holder != "" {
			return fmt.Errorf("pod %s (cgroup %s, %s): %v; remove that attachment on the node first (divert detach --pod-id %s), or pass --%s", pod.ID, pod.Cgroup, how, ce, ce.Holder, FlagCgroup)
		}
		if errors.As(err, &ce) {
			return fmt.Errorf("pod %s (cgroup %s, %s): %v; detach that pod first, or pass --%s", pod.ID, pod.Cgroup, how, ce, FlagCgroup)
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w; use --mode iptables", err)
		}
		return clierr.IncompatibleHint(err, pod.ID)
	}
	if len(gone) > 0 {
		fmt.Fprintf(out, "removed a stale attachment of pod %s (%s detached by the kernel)\n", pod.ID, strings.Join(gone, ", "))
	}
	fmt.Fprintf(out, "attached pod %s with eBPF: cgroup %s (%s), netns %s; outbound TCP to port %d, inbound %s to port %d; %s; pinned in %s\n",
		pod.ID, pod.Cgroup, how, pod.NetNS, r.cfg.ProxyPort, r.cfg.InboundPortsText(), r.cfg.InboundCapturePort, r.cfg.FamiliesText(), loader.PinDir(r.lopts, pod.ID))
	if r.cfg.DropInvalid {
		fmt.Fprintln(out, loader.DropInvalidNote)
	}
	// An earlier --mode iptables run (or istio-init) left istio's rules: they would capture
	// on top of eBPF. They go after eBPF is in, so capture has no gap; if they cannot go,
	// a fresh attachment is undone and the pod is left as it was.
	if err := loader.ClearFallback(pod.ID, r.lopts); err != nil {
		fmt.Fprintf(r.e.Stderr, "divert: %s\n", clierr.OneLine(err))
	}
	removed, err := r.removeIptables(ctx, held)
	if err != nil {
		if !created {
			return fmt.Errorf("pod %s is captured by eBPF, but istio's iptables rules in its netns could not be removed (%v): remove them with divert istio-iptables --cleanup-only and run again", pod.ID, clierr.OneLine(err))
		}
		if derr := r.e.Detach(pod.ID, r.lopts); derr != nil {
			err = errors.Join(err, derr)
		}
		return fmt.Errorf("istio's iptables rules in this pod's netns could not be removed, so the eBPF attachment was undone: %v", clierr.OneLine(err))
	}
	if len(removed) > 0 {
		fmt.Fprintf(out, "removed istio's iptables rules (%s) from %s, replaced by eBPF\n", strings.Join(removed, ", "), OwnNetNS)
	}
	return nil
}

// findIptables starts looking for the backends holding istio's rules in this pod's netns;
// the function it returns waits for the answer.
func (r *run) findIptables(ctx context.Context) func() ([]iptables.Backend, error) {
	if !r.e.IptablesAvailable() {
		return func() ([]iptables.Backend, error) { return nil, nil } // nothing can have written them here
	}
	type found struct {
		held []iptables.Backend
		err  error
	}
	done := make(chan found, 1)
	go func() {
		held, err := r.e.InstalledIptables(ctx, OwnNetNS)
		done <- found{held, err}
	}()
	return sync.OnceValues(func() ([]iptables.Backend, error) {
		f := <-done
		return f.held, f.err
	})
}

// removeIptables removes istio's rules from this pod's netns (found by findIptables),
// returning the backends that held them.
func (r *run) removeIptables(ctx context.Context, find func() ([]iptables.Backend, error)) ([]string, error) {
	held, err := find()
	if err != nil || len(held) == 0 {
		return nil, err
	}
	var names []string
	for _, b := range held {
		if err := r.e.CleanupIptables(ctx, OwnNetNS, b); err != nil {
			return nil, err
		}
		names = append(names, "iptables-"+b.String())
	}
	return names, nil
}

func (r *run) printEBPFPlan(w io.Writer, pod loader.Pod, how string) {
	fmt.Fprintf(w, "backend: ebpf (the kernel supports divert's programs), %s\n", r.cfg.FamiliesText())
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
	fmt.Fprintf(w, "policy: %s\n", r.cfg.CommandLine())
	if r.cfg.DropInvalid {
		fmt.Fprintln(w, loader.DropInvalidNote)
	}
}
