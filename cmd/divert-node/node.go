package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshdivert/divert/internal/clierr"
	"github.com/meshdivert/divert/internal/version"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node"
	"github.com/meshdivert/divert/policy"
)

// newRootCmd is the agent: what `divert node` ran before the agent had its own binary, with
// the same flags and help.
func newRootCmd(e env) *cobra.Command {
	var (
		agent      node.Agent
		run        node.RunOptions
		kubeconfig string
	)
	cmd := &cobra.Command{
		Use:   "divert-node [flags] [default policy flags]",
		Short: "Run the node agent: capture every meshed pod of this node (DaemonSet mode)",
		Long: `divert-node is divert's node agent, run once per node by a privileged DaemonSet instead
of an init container in every pod (as istio-cni replaces istio-init); divert node runs it
too. It installs the divert-cni plugin into the host's CNI bin dir and chains it into the
active conflist; for every pod the container runtime sets up, the plugin hands the pod to
the agent, which attaches divert to pods that run a sidecar (Istio's sidecar.istio.io/status
annotation, or the label divert.meshdivert.io/capture=true), configured by Istio's
traffic.sidecar.istio.io/* annotations. A reconcile loop attaches pods created while the
agent was down and removes pins of pods that are gone. Metrics are served in Prometheus'
text format.

The policy flags set the defaults that annotations refine (Istio's injector values).`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.String(),
	}
	cmd.SetVersionTemplate("{{.Version}}\n")
	cmd.SetOut(e.stdout)
	cmd.SetErr(e.stderr)
	fs := cmd.Flags()
	fs.StringVar(&agent.NodeName, "node-name", "", "this node's name (default $NODE_NAME)")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster config)")
	fs.StringVar(&agent.CgroupRoot, "cgroup-root", "", "where the host's /sys/fs/cgroup is mounted as the agent sees it: its cgroup2 mount is found there or below it, from /proc/self/mountinfo (a hybrid host's \"unified\"); default: the first cgroup2 mount in /proc/self/mounts")
	fs.StringVar(&agent.Loader.BPFFS, "bpffs", loader.DefaultBPFFS, "the host's bpffs")
	fs.StringVar(&run.Socket, "socket", "/var/run/divert/cni.sock", "unix socket the CNI plugin calls")
	fs.StringVar(&run.CNIBinDir, "cni-bin-dir", "/opt/cni/bin", "host CNI bin dir to install divert-cni into")
	fs.StringVar(&run.CNIConfDir, "cni-conf-dir", "/etc/cni/net.d", "host CNI config dir whose active conflist gets divert-cni chained")
	fs.StringVar(&run.PluginBinary, "plugin-binary", "", "the divert-cni binary to install (default: divert-cni next to this binary)")
	fs.BoolVar(&run.FailOpen, "fail-open", false, "let pods start uncaptured when the agent is unreachable (default: pod creation fails)")
	fs.StringSliceVar(&agent.ExcludeNamespaces, "exclude-namespaces", []string{"kube-system"}, "namespaces never captured; the plugin lets their pods start even while the agent is down")
	fs.StringVar(&run.UninstallOnExit, "uninstall-on-exit", "auto", "take divert-cni out of the conflist on shutdown: auto (when the agent's DaemonSet is gone or being deleted, not on a restart or upgrade; needs $POD_NAME and $POD_NAMESPACE), always, or never. Captured pods stay captured")
	fs.StringVar(&run.MetricsAddr, "metrics-addr", ":15099", "address for /metrics; empty to disable")
	removeIstio := fs.Bool("remove-istio-iptables", true, "remove istio's iptables rules (istio-init's) from the netns of a running pod once divert's programs capture it: a cluster moves from istio-init to node mode without restarts; false leaves both in place")
	fs.DurationVar(&run.ReconcileInterval, "reconcile-interval", 30*time.Second, "how often pins are compared with live pods")
	parse := policy.Flags(fs, policy.Default())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		var err error
		if agent.Defaults, err = parse(e.getenv); err != nil {
			return err
		}
		agent.KeepIstioIptables = !*removeIstio
		if agent.NodeName == "" {
			agent.NodeName = e.getenv("NODE_NAME")
		}
		if agent.NodeName == "" {
			return errors.New("missing --node-name: set it or $NODE_NAME (the DaemonSet passes spec.nodeName)")
		}
		if agent.CgroupRoot, err = clierr.CgroupRoot(agent.CgroupRoot, "/proc/self/mountinfo"); err != nil {
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
		if run.PluginBinary == "" {
			self, _ := os.Executable()
			run.PluginBinary = filepath.Join(filepath.Dir(self), node.PluginType)
		}
		run.SelfNamespace, run.SelfName = e.getenv("POD_NAMESPACE"), e.getenv("POD_NAME")
		return agent.Run(cmd.Context(), run)
	}
	return cmd
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
