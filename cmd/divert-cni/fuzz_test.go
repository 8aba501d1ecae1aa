package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshdivert/divert/node/cniapi"
)

const fuzzPrev = `"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],` +
	`"ips":[{"address":"10.1.2.3/24","gateway":"10.1.2.1","interface":0}],"routes":[{"dst":"0.0.0.0/0"}]}`

// FuzzPlugin runs the plugin's ADD, DEL and CHECK on any stdin (its conflist entry with the
// previous plugin's result) and CNI_ARGS, with an agent that answers or fails. Whatever the
// input:
//   - ADD asks the agent only for a named pod outside the excluded namespaces, once, with
//     the pod's identity from CNI_ARGS, the runtime's netns and the previous result's
//     addresses, each a valid IP (the agent refuses IPv6 pods from them);
//   - ADD that succeeds prints the previous result unchanged (chained plugins must), and
//     one that would not parse back is refused before the agent is asked;
//   - ADD fails when the agent fails, unless failOpen; it never fails because the pod is
//     skipped;
//   - DEL never fails (the runtime would retry it forever).
func FuzzPlugin(f *testing.F) {
	conf := func(extra string) []byte {
		return []byte(`{"cniVersion":"1.0.0","name":"k8s","type":"divert-cni"` + extra + `}`)
	}
	podArgs := "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=1f2e;K8S_POD_INFRA_CONTAINER_ID=abc"
	for _, s := range []struct {
		stdin, args string
		fail        bool
	}{
		{string(conf("," + fuzzPrev)), podArgs, false},
		{string(conf("," + fuzzPrev)), podArgs, true},
		{string(conf(`,"failOpen":true,` + fuzzPrev)), podArgs, true},
		{string(conf(`,"excludeNamespaces":["shop"],` + fuzzPrev)), podArgs, true},
		{string(conf("")), podArgs, false},
		{string(conf("," + fuzzPrev)), "K8S_POD_NAME=web", false},
		{string(conf("," + fuzzPrev)), "K8S_POD_NAME=web;BOGUS=1", false},
		{string(conf(`,"socket":"/nonexistent.sock",` + strings.Replace(fuzzPrev, "10.1.2.3/24", "fd00::3/64", 1))), podArgs, false},
		{`{"cniVersion":"0.3.1","name":"k8s","type":"divert-cni","prevResult":{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.2.3/24"}]}}`, podArgs, false},
		{`{"cniVersion":"0.4.0","prevResult":{"ips":[{"address":"10.1.2.3"}]}}`, podArgs, false},
		{`{`, podArgs, false},
		{`null`, "", false},
	} {
		for _, cmd := range []uint8{0, 1, 2} {
			f.Add(cmd, []byte(s.stdin), s.args, "/run/netns/x", s.fail)
		}
	}
	f.Fuzz(func(t *testing.T, cmd uint8, stdin []byte, cniArgs, netns string, agentFails bool) {
		var calls []cniapi.Request
		callAgent = func(_ context.Context, _ string, req cniapi.Request) (cniapi.Response, error) {
			calls = append(calls, req)
			if agentFails {
				return cniapi.Response{}, errors.New("agent unreachable")
			}
			return cniapi.Response{Captured: true}, nil
		}
		var out bytes.Buffer
		stdout = &out
		args := &skel.CmdArgs{ContainerID: "abc", Netns: netns, IfName: "eth0", Args: cniArgs, StdinData: stdin}

		switch cmd % 3 {
		case 1:
			if err := cmdDel(args); err != nil {
				t.Fatalf("DEL failed: %v", err)
			}
			checkCalls(t, calls, "DEL", args, nil)
			return
		case 2:
			cmdCheck(args) // anything but a panic
			if len(calls) != 0 {
				t.Fatalf("CHECK called the agent: %+v", calls)
			}
			return
		}
		err := cmdAdd(args)
		conf, k, perr := parse(args)
		if perr != nil || conf.PrevResult == nil {
			if err == nil || len(calls) != 0 {
				t.Fatalf("ADD of a config without a valid prevResult: err %v, calls %+v", err, calls)
			}
			return
		}
		if _, perr := printable(conf); perr != nil {
			if err == nil || len(calls) != 0 {
				t.Fatalf("ADD of an invalid prevResult (%v): err %v, calls %+v", perr, err, calls)
			}
			return
		}
		wantCall := k.K8S_POD_NAME != "" && !conf.excluded(string(k.K8S_POD_NAMESPACE))
		if !wantCall {
			if len(calls) != 0 {
				t.Fatalf("ADD of a skipped pod (%q in %q) called the agent", k.K8S_POD_NAME, k.K8S_POD_NAMESPACE)
			}
		} else {
			prev, cerr := current.NewResultFromResult(conf.PrevResult)
			var ips []string
			if cerr == nil {
				for _, ip := range prev.IPs {
					ips = append(ips, ip.Address.IP.String())
				}
			}
			checkCalls(t, calls, "ADD", args, ips)
			if agentFails && !conf.FailOpen {
				if err == nil || out.Len() != 0 {
					t.Fatalf("ADD with the agent failing and failOpen off: err %v, printed %q", err, out.String())
				}
				return
			}
		}
		if err != nil {
			t.Fatalf("ADD failed for a pod it should pass or capture: %v", err)
		}
		printed, err := version.NewResult(conf.CNIVersion, out.Bytes())
		if err != nil {
			t.Fatalf("ADD printed %q, not a %s result: %v", out.String(), conf.CNIVersion, err)
		}
		want, _ := conf.PrevResult.GetAsVersion(conf.CNIVersion)
		// Compared as JSON: an empty list and none are the same result.
		if got, want := asJSON(t, printed), asJSON(t, want); got != want {
			t.Fatalf("ADD changed the previous result:\n got %s\nwant %s", got, want)
		}
	})
}

// checkCalls: one request, with the pod's identity and netns as given and valid addresses.
func checkCalls(t *testing.T, calls []cniapi.Request, cmd string, args *skel.CmdArgs, ips []string) {
	t.Helper()
	k := &k8sArgs{}
	k.IgnoreUnknown = true
	if types.LoadArgs(args.Args, k) != nil || len(calls) == 0 {
		return // DEL of an unparsable config or without a pod uid: nothing to ask
	}
	if len(calls) != 1 {
		t.Fatalf("%s called the agent %d times", cmd, len(calls))
	}
	c := calls[0]
	if c.Command != cmd || c.Netns != args.Netns || c.PodName != string(k.K8S_POD_NAME) ||
		c.PodNamespace != string(k.K8S_POD_NAMESPACE) || c.PodUID != string(k.K8S_POD_UID) {
		t.Fatalf("%s asked %+v for CNI_ARGS %q, netns %q", cmd, c, args.Args, args.Netns)
	}
	for _, ip := range c.IPs {
		if _, err := netip.ParseAddr(ip); err != nil {
			t.Fatalf("%s sent address %q, which the agent cannot parse", cmd, ip)
		}
	}
	if cmd == "ADD" && !slices.Equal(c.IPs, ips) {
		t.Fatalf("ADD sent addresses %q, the previous result has %q", c.IPs, ips)
	}
}

func asJSON(t *testing.T, r types.Result) string {
	t.Helper()
	c, err := current.NewResultFromResult(r)
	if err != nil {
		t.Fatalf("convert %+v: %v", r, err)
	}
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
