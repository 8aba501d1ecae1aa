package e2e

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/test/k8s/e2e/cluster"
)

// Cluster DNS: CoreDNS behind the kube-dns Service, every pod's only nameserver. With
// Istio's DNS proxying on (ISTIO_META_DNS_CAPTURE), a pod's queries to it must reach the
// agent on 127.0.0.1:15053 instead (the test proxy stands in for istio-agent: it answers
// the probe name itself and forwards the rest to CoreDNS as the proxy's uid), and the
// answers must look as if the nameserver sent them. Without it they reach CoreDNS.

// The probe name's answers: the agent's (testapp) and CoreDNS's (its hosts plugin).
const probeAgent = "192.0.2.15"

var dnsServer = cluster.DNSServiceIP + ":53"

// dnsResult mirrors testapp's dns command output.
type dnsResult struct {
	Kind    string   `json:"kind"`
	Name    string   `json:"name"`
	Server  string   `json:"server"`
	From    string   `json:"from"`
	Peer    string   `json:"peer"`
	Via     []string `json:"via"`
	Answers []string `json:"answers"`
	RCode   string   `json:"rcode"`
	Err     string   `json:"err"`
}

func resolve(pod, ctr, kind, name string) (dnsResult, error) {
	out, err := suite.c.Kubectl(ctx, "exec", "-n", namespace, pod, "-c", ctr, "--", "/testapp", "dns", "--kind", kind, name)
	if err != nil {
		return dnsResult{}, err
	}
	var r dnsResult
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
		return r, fmt.Errorf("dns output %q: %w", out, err)
	}
	if r.Err != "" {
		return r, fmt.Errorf("%s query for %s in %s: %s", kind, name, pod, r.Err)
	}
	return r, nil
}

// dnsCase is one pod's DNS setting: proxy is its proxy container ("" if unmeshed), ebpf
// whether divert's eBPF captures it (else istio's iptables rules, or nothing).
type dnsCase struct {
	pod, proxy     string
	captured, ebpf bool
}

// TestDNS: the init-container pods. mesh-a (eBPF) and mesh-ipt (istio's iptables rules)
// have DNS proxying on, mesh-b (eBPF) and plain (unmeshed) not. Node mode's rows are in
// TestNodeMode.
func TestDNS(t *testing.T) {
	for _, c := range []dnsCase{
		{meshA, "proxy", true, true},
		{meshIpt, "proxy", true, false},
		{meshB, "proxy", false, true},
		{plainName, "", false, false},
	} {
		dnsRows(t, c)
	}
}

// dnsRows: the app resolves a Service name with Go's resolver (resolv.conf's search list),
// then asks the probe name over UDP from an unconnected socket (the
// reply's source must be the nameserver, or a resolver drops it) and over TCP. With
// capture, the agent answered the probe and its log shows the Service name forwarded
// upstream; without, CoreDNS answered everything. A meshed pod's TCP query without DNS
// capture is an ordinary TCP connection: captured to its proxy (as under istio's rules),
// which relays it to CoreDNS.
func dnsRows(t *testing.T, c dnsCase) {
	who := "coredns"
	if c.captured {
		who = "agent"
	}
	t.Run(c.pod+"/service-name", func(t *testing.T) {
		r := scenario(t)
		// <service>.<namespace>, the usual form: not in /etc/hosts (the bare name is the
		// plain pod's own hostname there), found by the search list's second domain after
		// an NXDOMAIN for the first.
		name := plainName + "." + namespace
		res, err := resolve(c.pod, "app", "go", name)
		if err != nil {
			r.fail(t, "%v", err)
		}
		if !slices.Equal(res.Answers, []string{serviceIPs[plainName]}) {
			r.fail(t, "%s resolved to %v, want plain's Service address %s", name, res.Answers, serviceIPs[plainName])
		}
		fqdn := plainName + "." + namespace + ".svc." + cluster.ClusterDomain + "."
		detail := fmt.Sprintf("%s -> %s", name, res.Answers[0])
		if c.captured {
			l := agentSaw(t, c.pod, c.proxy, fqdn)
			if l.Answered != "upstream "+dnsServer {
				r.fail(t, "the agent handled %s with %q, want it forwarded to CoreDNS (%s)", fqdn, l.Answered, dnsServer)
			}
			detail += "; via the agent, forwarded to CoreDNS as the proxy uid"
		} else if c.proxy != "" {
			noAgent(t, c.pod, c.proxy)
		}
		r.note("%s", detail)
	})
	for _, kind := range []string{"udp", "tcp"} {
		t.Run(c.pod+"/probe-"+kind, func(t *testing.T) {
			r := scenario(t)
			res, err := resolve(c.pod, "app", kind, cluster.DNSProbeName)
			if err != nil {
				r.fail(t, "%v", err)
			}
			want := cluster.DNSProbeCoreDNS
			if c.captured {
				want = probeAgent
			}
			if !slices.Equal(res.Answers, []string{want}) {
				r.fail(t, "%s answered %v over %s, want %s (%s)", cluster.DNSProbeName, res.Answers, kind, want, who)
			}
			// What the app's socket shows must be the nameserver whoever answered; except
			// a TCP connection eBPF redirected to the proxy, whose peer is the proxy's
			// address (docs/semantics.md: iptables' NAT shows the original).
			seen, wantSeen, via := res.From, dnsServer, []string(nil)
			if kind == "tcp" {
				seen = res.Peer
				if c.proxy != "" && !c.captured {
					via = []string{c.pod + "-proxy (orig " + dnsServer + ")"}
					if c.ebpf {
						wantSeen = "127.0.0.1:" + outboundPrt
					}
				}
			}
			if res.Server != dnsServer || seen != wantSeen {
				r.fail(t, "asked %s, answer seen from %s (want %s)", res.Server, seen, wantSeen)
			}
			if !slices.Equal(res.Via, via) {
				r.fail(t, "the %s query went through %v, want %v", kind, res.Via, via)
			}
			if c.captured {
				if l := agentSaw(t, c.pod, c.proxy, cluster.DNSProbeName+"."); l.Answered != "agent" {
					r.fail(t, "the agent's log: %+v", l)
				}
			}
			r.note("%s answered %s; the app saw it from %s%s", who, res.Answers[0], seen, strings.Join(append([]string{""}, via...), " via "))
		})
	}
}

// agentLine mirrors testapp's agent log line.
type agentLine struct {
	Agent    string `json:"agent"`
	Net      string `json:"net"`
	Client   string `json:"client"`
	Name     string `json:"name"`
	Answered string `json:"answered"`
	Err      string `json:"err"`
}

// agentSaw returns the agent's last log line about name (failing if there is none).
func agentSaw(t *testing.T, pod, ctr, name string) agentLine {
	t.Helper()
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", namespace, pod, "-c", ctr)
	if err != nil {
		t.Fatal(err)
	}
	var last *agentLine
	for _, l := range strings.Split(logs, "\n") {
		var a agentLine
		if json.Unmarshal([]byte(l), &a) == nil && a.Agent != "" && strings.EqualFold(a.Name, name) {
			last = &a
		}
	}
	if last == nil {
		t.Fatalf("the agent in %s/%s never saw a query for %s:\n%s", pod, ctr, name, tailLines(logs, 10))
	}
	if last.Err != "" {
		t.Fatalf("the agent in %s failed on %s: %s", pod, name, last.Err)
	}
	return *last
}

// noAgent checks that the pod's proxy runs no DNS agent (its log has no agent line): a pod
// without DNS proxying must have resolved through CoreDNS directly.
func noAgent(t *testing.T, pod, ctr string) {
	t.Helper()
	logs, err := suite.c.Kubectl(ctx, "logs", "-n", namespace, pod, "-c", ctr)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs, `"agent":`) {
		t.Fatalf("%s's proxy answered DNS, but DNS proxying is off there:\n%s", pod, tailLines(logs, 5))
	}
}

// nodeDNSPod is a node-mode pod with Istio's DNS proxying: ISTIO_META_DNS_CAPTURE in its
// istio-proxy container's environment, which the agent reads as istio-cni does (and then,
// reading no resolv.conf, captures port 53 of every destination).
func nodeDNSPod(name string) obj {
	p := nodePod(name, true, map[string]string{})
	for _, c := range containersOf(p) {
		if c["name"] == "proxy" {
			c["name"] = "istio-proxy"
		}
	}
	p["metadata"].(obj)["annotations"].(map[string]string)["sidecar.istio.io/status"] = `{"containers":["istio-proxy"]}`
	return withDNSCapture(p)
}
