package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Live migration (issue 18, item 7): a pod captured by istio-init with istio's iptables
// rules (divert istio-iptables --mode iptables, which writes them byte for byte) runs
// before node mode is installed; the agent's first reconcile attaches divert's programs and
// then takes istio's rules out of the pod's netns. After helm uninstall, divert to-iptables
// on the node puts istio's rules back for the policy in the pod's maps and only then
// detaches. Throughout each move its app dials out and an unmeshed pod dials in every
// 20 ms: every connection must reach its proxy with its original destination, and both
// captures must have carried some (the move happened while the traffic ran).
const (
	nodeMig = "node-mig"
	// migTraffic covers helm install (and Helm's link, if not done yet: 16 s) until the
	// agent's first reconcile is done (the agent was ready 2-10 s after helm install here,
	// load 5-20); migBackTraffic covers divert to-iptables, run 5 s in.
	migTraffic, migBackTraffic = 40 * time.Second, 15 * time.Second
)

// migLoops are the dial loops running through the forward move, started before the install.
var migLoops [2]<-chan clientOut

// migrationPodUp (before the install): the pod starts with istio's rules and no pins, and
// the traffic starts.
func migrationPodUp(t *testing.T) {
	r := scenario(t)
	p := meshedPod(nodeMig, iptables, istioTemplate, outboundPrt, suite.c.BPFFS)
	p["metadata"].(obj)["annotations"] = map[string]string{"sidecar.istio.io/status": `{"initContainers":["istio-init"],"containers":["proxy"]}`}
	if _, err := suite.c.KubectlIn(ctx, list(p), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	podReady(t, nodeMig, "120s")
	podListening(t, nodeMig, "proxy", "app")
	chains := istioChains(t, nodeMig)
	if chains == 0 {
		t.Fatal("istio-init (--mode iptables) left no ISTIO_ chains in the pod's netns")
	}
	if _, err := os.Stat(filepath.Join(suite.c.BPFFS, "divert", suite.uids[nodeMig])); err == nil {
		t.Fatal("the iptables pod has pins")
	}
	migLoops = migrationTraffic(migTraffic)
	r.note("%s %s: %d ISTIO_ chains, no pins; dialling out and in every 20 ms for %s", nodeMig, suite.ips[nodeMig], chains, migTraffic)
}

// migrationTraffic starts the two loops for d: the pod's app to plain's app, plain's app
// to the pod's app.
func migrationTraffic(d time.Duration) [2]<-chan clientOut {
	in := make(chan clientOut, 1)
	go func() {
		out, err := suite.c.Kubectl(ctx, "exec", "-n", namespace, plainName, "-c", "app", "--",
			"/testapp", "client", "--timeout", "3s", "--for", d.String(), "--interval", "20ms",
			"--target", addr(nodeMig, appPort))
		in <- clientOut{out, err, time.Now()}
	}()
	return [2]<-chan clientOut{dialFor(nodeMig, plainName, d), in}
}

// migrationToNode (after the install): the agent attached the pod and removed istio's
// rules; no connection escaped.
func migrationToNode(t *testing.T) {
	r := scenario(t)
	waitMigrated(t, true)
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", agentNS, "-l", agentLabel, "--tail=-1")
	if err != nil {
		t.Fatal(err)
	}
	var removed string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "removed istio's iptables rules") && strings.Contains(l, "pod="+namespace+"/"+nodeMig+" ") {
			removed = l[strings.Index(l, "backends="):]
		}
	}
	if removed == "" {
		t.Fatalf("the agent did not log removing %s's iptables rules:\n%s", nodeMig, tailLines(logs, 20))
	}
	r.note("agent logged the removal (%s); %s", removed, migrationChecked(t, migLoops, "iptables", "eBPF"))
}

// migrationBack (after helm uninstall): divert to-iptables on the node hands the pod back.
func migrationBack(t *testing.T) {
	r := scenario(t)
	loops := migrationTraffic(migBackTraffic)
	time.Sleep(5 * time.Second)
	divert := filepath.Join(*flagCache, "repo-bin", "divert")
	out, err := exec.CommandContext(ctx, divert, "to-iptables", "--bpffs", suite.c.BPFFS,
		"--agent-socket", filepath.Join(suite.c.State, "divert-run", "cni.sock"), "--pod-id", suite.uids[nodeMig]).CombinedOutput()
	if err != nil {
		t.Fatalf("divert to-iptables: %v\n%s", err, out)
	}
	waitMigrated(t, false)
	r.note("%s; to-iptables: %s", migrationChecked(t, loops, "eBPF", "iptables"), strings.TrimSpace(string(out)))
}

// waitMigrated waits until the pod is captured by divert alone (toNode) or by istio's
// rules alone.
func waitMigrated(t *testing.T, toNode bool) {
	t.Helper()
	pins := filepath.Join(suite.c.BPFFS, "divert", suite.uids[nodeMig])
	err := suite.c.WaitFor(ctx, "the pod's capture moved", 60*time.Second, func() error {
		_, err := os.Stat(pins)
		chains := istioChains(t, nodeMig)
		if toNode != (err == nil) || toNode != (chains == 0) {
			return fmt.Errorf("pins: %v, ISTIO_ chains: %d", err == nil, chains)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// migrationChecked waits for the loops and checks every connection was captured, by
// `from` first and `to` last (told apart by addresses: eBPF's outbound comes from
// 127.0.0.1, iptables' from the pod's address; sk_lookup delivers inbound to the app's
// address, REDIRECT to :15006).
func migrationChecked(t *testing.T, loops [2]<-chan clientOut, from, to string) string {
	t.Helper()
	var notes []string
	for i, dir := range []string{"outbound", "inbound"} {
		c := <-loops[i]
		if c.err != nil {
			t.Fatalf("%s loop: %v\n%s", dir, c.err, tailLines(c.out, 5))
		}
		var seq []string // capture of each connection, in order
		for n, l := range strings.Split(strings.TrimSpace(c.out), "\n") {
			var res result
			if err := json.Unmarshal([]byte(l), &res); err != nil {
				t.Fatalf("%s client line %q: %v", dir, l, err)
			}
			w := []want{{who: nodeMig + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)}, {who: plainName}}
			if dir == "inbound" {
				w = []want{{who: nodeMig + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(nodeMig, appPort)},
					{who: nodeMig + "-app", peerIP: "127.0.0.6"}}
			}
			if err := check(res, w...); err != nil {
				t.Fatalf("%s connection %d escaped capture: %v", dir, n+1, err)
			}
			seq = append(seq, captureOf(t, res, dir))
		}
		// from, then to, each at least once, never back.
		k := 0
		for k < len(seq) && seq[k] == from {
			k++
		}
		j := k
		for j < len(seq) && seq[j] == to {
			j++
		}
		if k == 0 || k == len(seq) || j != len(seq) {
			t.Fatalf("%s: captures in order %s, want %s then %s", dir, runs(seq), from, to)
		}
		notes = append(notes, fmt.Sprintf("%s %d via %s then %d via %s", dir, k, from, len(seq)-k, to))
	}
	return strings.Join(notes, ", ") + ", all through the proxy with their original destination"
}

func captureOf(t *testing.T, res result, dir string) string {
	h := res.Hops[0]
	if dir == "outbound" {
		if strings.HasPrefix(h.Peer, "127.0.0.1:") {
			return "eBPF"
		}
		return "iptables"
	}
	if h.Local == addr(nodeMig, inboundPrt) {
		return "iptables"
	}
	return "eBPF"
}

// runs writes a sequence as runs: "iptables x12, eBPF x3".
func runs(seq []string) string {
	var out []string
	for i := 0; i < len(seq); {
		j := i
		for j < len(seq) && seq[j] == seq[i] {
			j++
		}
		out = append(out, seq[i]+" x"+strconv.Itoa(j-i))
		i = j
	}
	return strings.Join(out, ", ")
}

// istioChains counts the ISTIO_ chains in the pod's netns (both iptables backends), read
// from the host through a process of the pod.
func istioChains(t *testing.T, pod string) int {
	t.Helper()
	var pid string
	for _, cg := range podCgroups(t, suite.uids[pod]) {
		filepath.WalkDir(cg, func(p string, d os.DirEntry, err error) error {
			if err == nil && pid == "" && d.Name() == "cgroup.procs" {
				b, _ := os.ReadFile(p)
				if f := strings.Fields(string(b)); len(f) > 0 {
					pid = f[0]
				}
			}
			return nil
		})
	}
	if pid == "" {
		t.Fatalf("no process of %s found", pod)
	}
	n := 0
	for _, save := range []string{"iptables-nft-save", "iptables-legacy-save"} {
		out, err := exec.CommandContext(ctx, "nsenter", "--net=/proc/"+pid+"/ns/net", save).Output()
		if err != nil {
			t.Fatalf("%s in %s's netns: %v", save, pod, err)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, ":ISTIO_") {
				n++
			}
		}
	}
	return n
}
