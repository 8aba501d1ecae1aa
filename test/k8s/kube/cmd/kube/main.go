// Command kube is the six Kubernetes commands the e2e cluster runs, linked into one
// binary the way hyperkube once was: kube-apiserver, kube-controller-manager,
// kube-scheduler, kubelet, kube-proxy and kubectl. One link instead of six (8 s instead of 36 s of
// linking on a cold build, 127 MB on disk instead of 395; docs/ci.md); each command below
// does exactly what that command's own main in k8s.io/kubernetes/cmd/<command> does. The
// price: every process initialises all six commands' packages (kubectl starts in 0.2 s
// instead of 0.1).
//
// The command is chosen by the name the binary is run as (test/k8s/e2e/cluster makes a
// symlink for each, so process names and command lines stay those of the real binaries) or,
// failing that, by the first argument:
//
//	kube-apiserver --etcd-servers=...     # via a symlink named kube-apiserver
//	kube kubectl get nodes                # the same as kubectl get nodes
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	// What the commands' own mains import for their side effects.
	_ "time/tzdata" // kube-apiserver, kube-controller-manager: CronJob time zones

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl: auth plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// commands maps each command name to its main. Each builds its cobra command only when
// chosen: some constructors install process-wide state (signal handlers) when called.
var commands = map[string]func() int{
	"kube-apiserver": func() int {
		return cli.Run(apiserver.NewAPIServerCommand())
	},
	"kube-controller-manager": func() int {
		return cli.Run(controllermanager.NewControllerManagerCommand())
	},
	"kube-scheduler": func() int {
		return cli.Run(scheduler.NewSchedulerCommand())
	},
	"kubelet": func() int {
		return cli.Run(kubelet.NewKubeletCommand(context.Background()))
	},
	"kube-proxy": func() int {
		return cli.Run(proxy.NewProxyCommand())
	},
	"kubectl": func() int {
		logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
		if err := cli.RunNoErrOutput(kubectlcmd.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err) // prints the error and exits non-zero
		}
		return 0
	},
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := commands[name]; !ok && len(os.Args) > 1 {
		// kube <command> [args]: the commands read os.Args themselves (kubectl looks for
		// plugins in it, cobra parses os.Args[1:]), so make it what their own binary sees.
		name = os.Args[1]
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	run, ok := commands[name]
	if !ok {
		names := make([]string, 0, len(commands))
		for n := range commands {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Fprintf(os.Stderr, "usage: kube <command> [args], or run it through a link named <command>\ncommands: %s\n", strings.Join(names, ", "))
		os.Exit(2)
	}
	os.Exit(run())
}
