package node

import (
	"context"
	"fmt"
	"time"
)

// RunOptions are how the agent meets its node: the plugin's socket, the host's CNI
// directories, metrics, and what to leave behind on exit.
type RunOptions struct {
	// Socket is the unix socket the CNI plugin calls.
	Socket string
	// CNIBinDir receives the plugin binary PluginBinary; CNIConfDir holds the active
	// conflist the plugin is chained into.
	CNIBinDir, CNIConfDir, PluginBinary string
	// MetricsAddr serves /metrics; empty disables it.
	MetricsAddr string
	// FailOpen lets pods start uncaptured when the agent is unreachable.
	FailOpen bool
	// UninstallOnExit is "auto" (when the agent's DaemonSet is gone or being deleted, told
	// by SelfNamespace/SelfName, the agent's own pod), "always" or "never".
	UninstallOnExit         string
	SelfNamespace, SelfName string
	// ReconcileInterval is how often pins are compared with live pods.
	ReconcileInterval time.Duration
}

// Run is the node agent's life: serve the plugin (and metrics), refresh every pod's pins,
// install and chain the plugin, reconcile until ctx ends, then unchain if the agent is
// being uninstalled.
func (a *Agent) Run(ctx context.Context, o RunOptions) error {
	switch o.UninstallOnExit {
	case "auto", "always", "never":
	default:
		return fmt.Errorf("invalid --uninstall-on-exit %q: use auto, always or never", o.UninstallOnExit)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	go func() { errc <- a.Serve(ctx, o.Socket) }()
	if o.MetricsAddr != "" {
		go func() { errc <- a.ServeMetrics(ctx, o.MetricsAddr) }()
	}
	// Refresh every pin first: an upgraded agent swaps in its programs (link.Update, no
	// gap) and pods created while it was down get captured, before new pods are chained.
	if err := a.Reconcile(ctx, true); err != nil {
		a.log().Error("reconcile", "err", err)
	}
	if err := InstallPlugin(o.PluginBinary, o.CNIBinDir); err != nil {
		return err
	}
	conflist, err := ActiveConflist(o.CNIConfDir)
	if err != nil {
		return err
	}
	entry := map[string]any{"socket": o.Socket}
	if o.FailOpen {
		entry["failOpen"] = true
	}
	if len(a.ExcludeNamespaces) > 0 {
		entry["excludeNamespaces"] = a.ExcludeNamespaces
	}
	// The DaemonSet is watched from now on: by the time this agent is told to stop, an
	// uninstall may have deleted the Role that lets it read the DaemonSet. The watch
	// outlives ctx (cancelled on SIGTERM) until leave has decided.
	var owner *OwnerWatch
	if o.UninstallOnExit == "auto" && o.SelfName != "" {
		wctx, wcancel := context.WithCancel(context.Background())
		defer wcancel()
		if owner, err = WatchOwner(wctx, a.Client, o.SelfNamespace, o.SelfName); err != nil {
			a.log().Warn("not watching the agent's DaemonSet: an uninstall is recognised only while its Role stays", "err", err)
		}
	}
	if _, err := Chain(conflist, entry); err != nil {
		return fmt.Errorf("chain divert-cni into %s: %w", conflist, err)
	}
	a.log().Info("ready", "conflist", conflist, "socket", o.Socket, "node", a.NodeName)
	defer a.leave(conflist, o, owner)
	tick := time.NewTicker(o.ReconcileInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-tick.C:
			if err := a.Reconcile(ctx, false); err != nil {
				a.log().Error("reconcile", "err", err)
			}
		}
	}
}

// leave takes the plugin out of the conflist if the agent is being uninstalled; on a
// restart or upgrade it stays, so new pods wait for the next agent.
func (a *Agent) leave(conflist string, o RunOptions, owner *OwnerWatch) {
	remove, why := o.UninstallOnExit == "always", "--uninstall-on-exit=always"
	switch {
	case owner != nil:
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		remove, why = owner.Uninstalling(ctx)
		cancel()
	case o.UninstallOnExit == "auto":
		why = "$POD_NAME unset, cannot tell an uninstall from a restart"
	case o.UninstallOnExit == "never":
		why = "--uninstall-on-exit=never"
	}
	if !remove {
		a.log().Info("leaving divert-cni chained: new pods wait for the next agent", "why", why)
		return
	}
	// The binary stays: pods set up through the plugin still need it for CNI DEL.
	if _, err := Unchain(conflist); err != nil {
		a.log().Error("unchain", "err", err)
		return
	}
	a.log().Info("uninstalled: divert-cni taken out of the conflist", "why", why, "conflist", conflist)
}
