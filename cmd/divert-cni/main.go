// Command divert-cni is a chained CNI plugin: it runs after the plugin that set up the
// pod's network, hands the pod (netns, namespace, name, uid, IPs) to the divert node
// agent over a unix socket, and returns the previous result unchanged. If the agent
// cannot be reached for ADD, pod creation fails (fail closed) unless failOpen is set:
// a meshed pod must not run uncaptured by accident.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshdivert/divert/node/cniapi"
)

// DefaultSocket is where the agent listens unless the plugin config says otherwise.
const DefaultSocket = "/var/run/divert/cni.sock"

// addTimeout bounds how long ADD waits for the agent. The agent attaches pods one at a
// time, each loading and verifying its programs (~0.1 s of CPU, seconds of wall on a loaded
// node: issue 24), so a burst of pod starts queues there; the bound stays under the
// kubelet's 2-minute runtime request timeout, so the pod's events show divert's error
// rather than the kubelet's.
const addTimeout = 90 * time.Second

// pluginConf is the plugin's entry in the conflist.
type pluginConf struct {
	types.PluginConf
	// Socket is the agent's unix socket.
	Socket string `json:"socket,omitempty"`
	// FailOpen lets pods start uncaptured when the agent is unreachable.
	FailOpen bool `json:"failOpen,omitempty"`
	// ExcludeNamespaces are never handed to the agent, so their pods start even while
	// the agent is down (the cluster's own components: kube-system by default).
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
}

func (c *pluginConf) excluded(namespace string) bool {
	return slices.Contains(c.ExcludeNamespaces, namespace)
}

// k8sArgs are the CNI_ARGS a container runtime passes for Kubernetes pods.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI's names
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
}

// The plugin's outside world, replaced by the fuzz test: the agent and stdout.
var (
	callAgent           = cniapi.Call
	stdout    io.Writer = os.Stdout
)

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck}, version.All, "divert-cni: hands pods to the divert node agent")
}

func parse(args *skel.CmdArgs) (*pluginConf, *k8sArgs, error) {
	conf := &pluginConf{}
	if err := json.Unmarshal(args.StdinData, conf); err != nil {
		return nil, nil, fmt.Errorf("divert-cni: parse config: %w", err)
	}
	if conf.Socket == "" {
		conf.Socket = DefaultSocket
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, nil, fmt.Errorf("divert-cni: parse prevResult: %w", err)
	}
	k := &k8sArgs{}
	k.IgnoreUnknown = true
	if err := types.LoadArgs(args.Args, k); err != nil {
		return nil, nil, fmt.Errorf("divert-cni: parse CNI_ARGS: %w", err)
	}
	return conf, k, nil
}

func request(cmd string, args *skel.CmdArgs, k *k8sArgs, prev types.Result) cniapi.Request {
	req := cniapi.Request{
		Command: cmd, Netns: args.Netns,
		PodNamespace: string(k.K8S_POD_NAMESPACE), PodName: string(k.K8S_POD_NAME), PodUID: string(k.K8S_POD_UID),
	}
	if prev != nil {
		if res, err := current.NewResultFromResult(prev); err == nil {
			for _, ip := range res.IPs {
				req.IPs = append(req.IPs, ip.Address.IP.String())
			}
		}
	}
	return req
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, k, err := parse(args)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return fmt.Errorf("divert-cni must be chained after a plugin that sets up the pod's network (no prevResult)")
	}
	res, err := printable(conf)
	if err != nil {
		return err
	}
	if k.K8S_POD_NAME != "" && !conf.excluded(string(k.K8S_POD_NAMESPACE)) {
		ctx, cancel := context.WithTimeout(context.Background(), addTimeout)
		defer cancel()
		if _, err := callAgent(ctx, conf.Socket, request("ADD", args, k, conf.PrevResult)); err != nil {
			if !conf.FailOpen {
				return fmt.Errorf("divert: pod %s/%s not captured: %v (the pod is not started uncaptured; set failOpen in the divert-cni config to allow that)",
					k.K8S_POD_NAMESPACE, k.K8S_POD_NAME, err)
			}
			fmt.Fprintf(os.Stderr, "divert-cni: pod %s/%s starts uncaptured (failOpen): %v\n", k.K8S_POD_NAMESPACE, k.K8S_POD_NAME, err)
		}
	}
	return res.PrintTo(stdout)
}

// printable is the previous plugin's result, unchanged but for the version the runtime asked
// for. The CNI library accepts results it then prints as "<nil>" (an IP or a route without
// an address: found by FuzzPlugin); one that does not parse back is refused here, before the
// agent sees its addresses, rather than handed to the runtime.
func printable(conf *pluginConf) (types.Result, error) {
	res, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return nil, fmt.Errorf("divert-cni: prevResult as version %s: %w", conf.CNIVersion, err)
	}
	var buf bytes.Buffer
	if err := res.PrintTo(&buf); err != nil {
		return nil, err
	}
	if _, err := version.NewResult(conf.CNIVersion, buf.Bytes()); err != nil {
		return nil, fmt.Errorf("divert-cni: invalid prevResult: %w", err)
	}
	return res, nil
}

// cmdDel asks the agent to detach. It never fails: DEL must succeed even when the agent is
// gone, and the agent's reconcile removes what a lost DEL leaves behind.
func cmdDel(args *skel.CmdArgs) error {
	conf, k, err := parse(args)
	if err != nil || k.K8S_POD_UID == "" || conf.excluded(string(k.K8S_POD_NAMESPACE)) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := callAgent(ctx, conf.Socket, request("DEL", args, k, nil)); err != nil {
		fmt.Fprintf(os.Stderr, "divert-cni: detach pod %s/%s: %v (reconcile will clean up)\n", k.K8S_POD_NAMESPACE, k.K8S_POD_NAME, err)
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, _, err := parse(args)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return fmt.Errorf("divert-cni must be chained after a plugin that sets up the pod's network (no prevResult)")
	}
	return nil
}
