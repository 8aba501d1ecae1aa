package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node"
	"github.com/meshdivert/divert/policy"
)

func newNodeCmd(e env) *cobra.Command {
	var (
		agent                               node.Agent
		kubeconfig, socket, binDir, confDir string
		pluginBinary, metricsAddr           string
		failOpen                            bool
		uninstall                           string
		interval                            time.Duration
	)
	cmd := &cobra.Command{
		Use:   "node [flags] [default policy flags]",
		Short: "Run the node agent: capture every meshed pod of this node (DaemonSet mode)",
		Long: `node is divert's node agent, run once per node by a privileged DaemonSet instead of an
init container in every pod (as istio-cni replaces istio-init). It installs the divert-cni
plugin into the host's CNI bin dir and chains it into the active conflist; for every pod the
container runtime sets up, the plugin hands the pod to the agent, which attaches divert to
pods that run a sidecar (Istio's sidecar.istio.io/status annotation, or the label
divert.meshdivert.io/capture=true), configured by Istio's traffic.sidecar.istio.io/*
annotations. A reconcile loop attaches pods created while the agent was down and removes
pins of pods that are gone. Metrics are served in Prometheus' text format.

The policy flags set the defaults that annotations refine (Istio's injector values).`,
		Args: cobra.NoArgs,
	}
	fs := cmd.Flags()
	fs.StringVar(&agent.NodeName, "node-name", "", "this node's name (default $NODE_NAME)")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster config)")
	fs.StringVar(&agent.CgroupRoot, "cgroup-root", "", "where the host's /sys/fs/cgroup is mounted as the agent sees it: its cgroup2 mount is found there or below it, from /proc/self/mountinfo (a hybrid host's \"unified\"); default: the first cgroup2 mount in /proc/self/mounts")
	fs.StringVar(&agent.Loader.BPFFS, "bpffs", loader.DefaultBPFFS, "the host's bpffs")
	fs.StringVar(&socket, "socket", "/var/run/divert/cni.sock", "unix socket the CNI plugin calls")
	fs.StringVar(&binDir, "cni-bin-dir", "/opt/cni/bin", "host CNI bin dir to install divert-cni into")
	fs.StringVar(&confDir, "cni-conf-dir", "/etc/cni/net.d", "host CNI config dir whose active conflist gets divert-cni chained")
	fs.StringVar(&pluginBinary, "plugin-binary", "", "the divert-cni binary to install (default: divert-cni next to this binary)")
	fs.BoolVar(&failOpen, "fail-open", false, "let pods start uncaptured when the agent is unreachable (default: pod creation fails)")
	fs.StringSliceVar(&agent.ExcludeNamespaces, "exclude-namespaces", []string{"kube-system"}, "namespaces never captured; the plugin lets their pods start even while the agent is down")
	fs.StringVar(&uninstall, "uninstall-on-exit", "auto", "take divert-cni out of the conflist on shutdown: auto (when the agent's DaemonSet is gone or being deleted, not on a restart or upgrade; needs $POD_NAME and $POD_NAMESPACE), always, or never. Captured pods stay captured")
	fs.StringVar(&metricsAddr, "metrics-addr", ":15099", "address for /metrics; empty to disable")
	fs.DurationVar(&interval, "reconcile-interval", 30*time.Second, "how often pins are compared with live pods")
	parse := policy.Flags(fs, policy.Default())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		var err error
		if agent.Defaults, err = parse(e.getenv); err != nil {
			return err
		}
		switch uninstall {
		case "auto", "always", "never":
		default:
			return fmt.Errorf("invalid --uninstall-on-exit %q: use auto, always or never", uninstall)
		}
		if agent.NodeName == "" {
			agent.NodeName = e.getenv("NODE_NAME")
		}
		if agent.NodeName == "" {
			return errors.New("missing --node-name: set it or $NODE_NAME (the DaemonSet passes spec.nodeName)")
		}
		if agent.CgroupRoot, err = nodeCgroupRoot(agent.CgroupRoot, "/proc/self/mountinfo"); err != nil {
			return err
		}
		cfg, err := kubeConfig(kubeconfig)
		if err != nil {
			return err
		}
		if agent.Client, err = kubernetes.NewForConfig(cfg); err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		agent.Log = slog.New(slog.NewTextHandler(e.stderr, nil))
		if pluginBinary == "" {
			self, _ := os.Executable()
			pluginBinary = filepath.Join(filepath.Dir(self), node.PluginType)
		}
		self := podRef{e.getenv("POD_NAMESPACE"), e.getenv("POD_NAME")}
		return runNode(cmd.Context(), &agent, socket, binDir, confDir, pluginBinary, metricsAddr, failOpen, uninstall, self, interval)
	}
	return cmd
}

// podRef names the agent's own pod (from the downward API), to tell an uninstall from a
// restart.
type podRef struct{ namespace, name string }

func runNode(ctx context.Context, a *node.Agent, socket, binDir, confDir, plugin, metricsAddr string, failOpen bool, uninstall string, self podRef, interval time.Duration) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	go func() { errc <- a.Serve(ctx, socket) }()
	if metricsAddr != "" {
		go func() { errc <- a.ServeMetrics(ctx, metricsAddr) }()
	}
	// Refresh every pin first: an upgraded agent swaps in its programs (link.Update, no
	// gap) and pods created while it was down get captured, before new pods are chained.
	if err := a.Reconcile(ctx, true); err != nil {
		a.Log.Error("reconcile", "err", err)
	}
	if err := node.InstallPlugin(plugin, binDir); err != nil {
		return err
	}
	conflist, err := node.ActiveConflist(confDir)
	if err != nil {
		return err
	}
	entry := map[string]any{"socket": socket}
	if failOpen {
		entry["failOpen"] = true
	}
	if len(a.ExcludeNamespaces) > 0 {
		entry["excludeNamespaces"] = a.ExcludeNamespaces
	}
	if _, err := node.Chain(conflist, entry); err != nil {
		return fmt.Errorf("chain divert-cni into %s: %w", conflist, err)
	}
	a.Log.Info("ready", "conflist", conflist, "socket", socket, "node", a.NodeName)
	defer func() {
		remove, why := uninstall == "always", "--uninstall-on-exit=always"
		switch {
		case uninstall == "auto" && self.name != "":
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			remove, why = node.Uninstalling(ctx, a.Client, self.namespace, self.name)
			cancel()
		case uninstall == "auto":
			why = "$POD_NAME unset, cannot tell an uninstall from a restart"
		case uninstall == "never":
			why = "--uninstall-on-exit=never"
		}
		if !remove {
			a.Log.Info("leaving divert-cni chained: new pods wait for the next agent", "why", why)
			return
		}
		// The binary stays: pods set up through the plugin still need it for CNI DEL.
		if _, err := node.Unchain(conflist); err != nil {
			a.Log.Error("unchain", "err", err)
			return
		}
		a.Log.Info("uninstalled: divert-cni taken out of the conflist", "why", why, "conflist", conflist)
	}()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-tick.C:
			if err := a.Reconcile(ctx, false); err != nil {
				a.Log.Error("reconcile", "err", err)
			}
		}
	}
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("not in a cluster (%v): pass --kubeconfig", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("invalid --kubeconfig %q: %w", path, err)
	}
	return cfg, nil
}

// nodeCgroupRoot turns --cgroup-root into the cgroup2 mount the agent works in: found at or
// below it in mountinfo (the DaemonSet mounts the host's /sys/fs/cgroup, which is the cgroup2
// mount on a cgroup v2 host and holds it, as "unified", on a hybrid one); without the flag,
// the first cgroup2 mount.
func nodeCgroupRoot(flag, mountinfo string) (string, error) {
	if flag == "" {
		return cgroup2Mount()
	}
	m, err := cgroups.RootMount(flag, mountinfo)
	if err != nil {
		return "", fmt.Errorf("invalid --cgroup-root %q: %v; pass where the host's /sys/fs/cgroup is mounted", flag, err)
	}
	return m.Point, nil
}

// cgroup2Mount finds where cgroup v2 is mounted (hybrid hosts mount it below
// /sys/fs/cgroup, so it is never assumed).
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 2 && fields[2] == "cgroup2" {
			return fields[1], nil
		}
	}
	return "", errors.New("no cgroup2 mount in /proc/self/mounts: divert needs cgroup v2 (pass --cgroup-root if it is mounted elsewhere)")
}
