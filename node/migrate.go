package node

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// Live migration from istio-init to node mode: a pod that istio-init captured with istio's
// iptables rules is attached by the agent like any selected pod without pins (Reconcile),
// and once divert's programs capture it, istio's rules are taken out of its netns. The
// order is what keeps every new connection captured: while both are in place, eBPF
// decides first (the connect hook sends the app's connection to 127.0.0.1:15001, which
// istio's ISTIO_OUTPUT returns; inbound, nat PREROUTING's REDIRECT to 15006 happens before
// sk_lookup, and the proxy reads the kernel's SO_ORIGINAL_DST, which divert's getsockopt
// program leaves alone), so either alone, or both, capture. docs/install.md, "Migration".

// takeOverIptables removes istio's iptables rules from the netns of a selected pod that
// divert's programs capture, once per pod sandbox: after its init containers ran (an
// istio-init still to come would put them back), only if the pins capture this very
// netns, and never when KeepIstioIptables is set. A failure leaves both captures in place
// (safe) and is retried at the next reconcile. netns may be "" (found from the pod).
func (a *Agent) takeOverIptables(ctx context.Context, pod *corev1.Pod, netns string) error {
	err := a.removeIstioIptables(ctx, pod, netns)
	if err != nil {
		a.countError(opRemoveIptables)
	}
	return err
}

func (a *Agent) removeIstioIptables(ctx context.Context, pod *corev1.Pod, netns string) error {
	id := string(pod.UID)
	if a.KeepIstioIptables || !initialized(pod) {
		return nil
	}
	a.mu.Lock()
	done := a.iptablesChecked[id]
	a.mu.Unlock()
	if done {
		return nil
	}
	if netns == "" {
		var err error
		if netns, err = a.podNetns(pod); err != nil {
			return nil // not running: nothing to take over yet
		}
	}
	backends, err := iptables.Installed(ctx, netns)
	if err != nil {
		return fmt.Errorf("pod %s: read its iptables rules: %w", key(pod), err)
	}
	if cfg, _, err := Config(pod, a.Defaults); len(backends) > 0 && err == nil && cfg.Mode == policy.TProxy {
		// istio's TPROXY rules come with a policy route in the pod's netns, which divert's
		// TPROXY return path may share: both stay (both capture), and nothing is removed.
		a.log().Info("left istio's iptables rules in place: the pod captures in TPROXY mode", "pod", key(pod), "uid", id)
		backends = nil
	}
	if len(backends) > 0 {
		if err := capturesNetns(id, netns, a.Loader); err != nil {
			return fmt.Errorf("pod %s holds istio's iptables rules, left in place: %w", key(pod), err)
		}
		if err := iptables.Cleanup(ctx, netns); err != nil {
			return fmt.Errorf("pod %s is captured by divert, but istio's iptables rules could not all be removed (what is left still captures): %w", key(pod), err)
		}
		if err := loader.ClearFallback(id, a.Loader); err != nil {
			a.log().Warn("clear fallback marker", "pod", key(pod), "err", err)
		}
		a.log().Info("removed istio's iptables rules: divert's programs capture the pod", "pod", key(pod), "uid", id, "backends", fmt.Sprint(backends))
	}
	a.mu.Lock()
	if a.iptablesChecked == nil {
		a.iptablesChecked = map[string]bool{}
	}
	a.iptablesChecked[id] = true
	a.mu.Unlock()
	return nil
}

// forgetIptablesCheck makes the next reconcile look at the pod's netns again: CNI ADD gives
// the pod a new sandbox, whose istio-init (if it has one) runs after the attach.
func (a *Agent) forgetIptablesCheck(uid string) {
	a.mu.Lock()
	delete(a.iptablesChecked, uid)
	a.mu.Unlock()
}

// capturesNetns says whether pod id's pins capture the netns at netns: a complete attach
// (not inert), every program attached (none defunct), its sk_lookup program (when inbound
// capture is on) in this very netns. Anything else keeps istio's rules.
func capturesNetns(id, netns string, opts loader.Options) error {
	st, err := loader.Status(id, opts)
	if err != nil {
		return err
	}
	switch {
	case st.Inert:
		return errors.New("its divert attach is inert (interrupted): nothing else would capture")
	case st.Defunct || !st.HasProgram("divert_connect4"):
		return errors.New("divert's programs are not all attached: " + st.Health)
	}
	var fi unix.Stat_t
	if err := unix.Stat(netns, &fi); err != nil {
		return fmt.Errorf("stat netns %s: %w", netns, err)
	}
	for _, p := range st.Programs {
		if p.NetNSIno != 0 && p.NetNSIno != fi.Ino {
			return fmt.Errorf("divert's %s is attached to netns inode %d, the pod runs in %d", p.Name, p.NetNSIno, fi.Ino)
		}
	}
	return nil
}

// initialized reports whether the pod's init containers have all run (condition
// Initialized): istio-init, if the pod has one, has written its rules by then.
func initialized(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodInitialized {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
