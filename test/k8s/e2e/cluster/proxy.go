package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// kube-proxy runs on the host (as the kubelet does), from the same Kubernetes build, in one
// of two modes; the tests switch between them mid-run (SetProxyMode), so one cluster
// proves both. Its ports are off the defaults, as the other components' are.
const (
	ProxyIPTables = "iptables"
	ProxyNFTables = "nftables"
	proxyHealthz  = 12256
	proxyMetrics  = 12249
	// KubernetesVIP is the kubernetes Service's ClusterIP (the first of ServiceCIDR).
	KubernetesVIP = "10.96.0.1"
)

// kubeProxyConfig: clusterCIDR tells pod traffic from the rest (kube-proxy masquerades
// only the rest, and a pod reaching itself through a Service: the hairpin). The conntrack
// settings at 0 and localhostNodePorts off keep kube-proxy from changing host sysctls it
// would otherwise set (nf_conntrack_max, the TCP timeouts, route_localnet); NodePorts
// only on the node's primary address.
func (c *Cluster) kubeProxyConfig(mode string) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: %s
clientConnection:
  kubeconfig: %s
hostnameOverride: %s
clusterCIDR: %s,%s
healthzBindAddress: 127.0.0.1:%d
metricsBindAddress: 127.0.0.1:%d
nodePortAddresses: ["primary"]
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
`, mode, c.path("kube-proxy.kubeconfig"), NodeName, PodCIDR, PodCIDR6, proxyHealthz, proxyMetrics)
}

// ProxyMode is the mode kube-proxy runs in now.
func (c *Cluster) ProxyMode() string { return c.proxyMode }

// SetProxyMode restarts kube-proxy in mode (a no-op if it runs in it already) and waits
// until it serves the kubernetes Service again. The new kube-proxy removes the other
// mode's rules itself at start, as kube-proxy does when a node changes mode.
func (c *Cluster) SetProxyMode(ctx context.Context, mode string) error {
	if mode == c.proxyMode {
		return nil
	}
	if err := c.stop("kube-proxy"); err != nil {
		return err
	}
	return c.startProxy(ctx, mode)
}

func (c *Cluster) startProxy(ctx context.Context, mode string) error {
	if err := c.start("kube-proxy", c.bins.Proxy, "--config", c.path("kube-proxy", mode+".yaml")); err != nil {
		return err
	}
	c.proxyMode = mode
	cl := &http.Client{Timeout: 2 * time.Second}
	return c.WaitFor(ctx, "kube-proxy ("+mode+") synced", 60*time.Second, func() error {
		if err := httpOK(cl, fmt.Sprintf("http://127.0.0.1:%d/healthz", proxyHealthz)); err != nil {
			return err
		}
		return c.ProxyServes(KubernetesVIP)
	}, "kube-proxy", "kube-apiserver")
}

// ProxyRules is kube-proxy's ruleset on the host in its current mode: iptables-save's
// (through the same iptables kube-proxy runs; a Service without endpoints is a REJECT
// rule in the filter table, not in nat), or its nftables table.
func (c *Cluster) ProxyRules() (string, error) {
	var out []byte
	var err error
	if c.proxyMode == ProxyNFTables {
		out, err = exec.Command("nft", "list", "table", "ip", "kube-proxy").CombinedOutput()
	} else {
		out, err = exec.Command("iptables-save").CombinedOutput()
	}
	if err != nil {
		return "", fmt.Errorf("%s rules: %v: %s", c.proxyMode, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// ProxyServes fails unless kube-proxy's current rules name every one of ips: ClusterIPs (a
// Service created a moment ago is only handled once kube-proxy has synced it, forwarding
// or, without endpoints, rejecting), or pod addresses (a Service's endpoint is only used
// once kube-proxy has it).
func (c *Cluster) ProxyServes(vips ...string) error {
	rules, err := c.ProxyRules()
	if err != nil {
		return err
	}
	for _, v := range vips {
		if !mentionsIP(rules, v) {
			return fmt.Errorf("kube-proxy (%s) has no rule for %s yet", c.proxyMode, v)
		}
	}
	return nil
}

// mentionsIP reports whether text names ip as a whole address: iptables-save writes
// "-d 10.96.0.1/32", nftables "10.96.0.1 . tcp . 443"; 10.96.0.10 is not 10.96.0.1.
func mentionsIP(text, ip string) bool {
	for i := 0; ; {
		j := strings.Index(text[i:], ip)
		if j < 0 {
			return false
		}
		start, end := i+j, i+j+len(ip)
		before := start == 0 || !strings.ContainsRune("0123456789.", rune(text[start-1]))
		after := end < len(text) && (text[end] == '/' || text[end] == ' ')
		if before && after {
			return true
		}
		i = end
	}
}

// serviceRoute makes the cluster's bridge before CNI does (the bridge plugin takes an
// existing one) and routes the Service CIDR to it. kube-proxy translates a ClusterIP
// before routing, so the route only matters for a packet it does not translate (a Service
// it has not synced yet, or none during a mode switch): without it such a packet would
// follow the default route off this machine; with it, it stays on the bridge, where
// nothing answers. The host's own connections to a ClusterIP need some route too.
func serviceRoute() error {
	for _, args := range [][]string{
		{"link", "add", Bridge, "type", "bridge"},
		{"link", "set", Bridge, "up"},
		{"route", "add", ServiceCIDR, "dev", Bridge},
		{"-6", "route", "add", ServiceCIDR6, "dev", Bridge},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// cleanupProxy removes kube-proxy's rules of every mode with its own --cleanup, as an
// operator removing kube-proxy from a node does; restoreIptables and restoreNFTables then
// check the result against the host's record.
func (c *Cluster) cleanupProxy() error {
	if c.bins.Proxy == "" {
		return nil
	}
	out, err := exec.Command(c.bins.Proxy, "--cleanup").CombinedOutput()
	if err != nil {
		return fmt.Errorf("kube-proxy --cleanup: %v\n%s", err, tail(out, 10))
	}
	return nil
}

// nftTables lists the host's nftables tables as "family name".
func nftTables() ([]string, error) {
	if _, err := exec.LookPath("nft"); err != nil {
		return nil, nil
	}
	out, err := exec.Command("nft", "list", "tables").Output()
	if err != nil {
		return nil, fmt.Errorf("nft list tables: %w", err)
	}
	tables := []string{} // recorded as [], not null: an old record without it is told apart
	for _, l := range strings.Split(string(out), "\n") {
		if t, ok := strings.CutPrefix(strings.TrimSpace(l), "table "); ok {
			tables = append(tables, t)
		}
	}
	return tables, nil
}

// iptablesNFTTables are the tables iptables-nft makes when a rule is first added to one
// (kube-proxy's iptables mode does): empty, they are what it leaves after its rules go.
var iptablesNFTTables = []string{"nat", "filter", "mangle", "raw", "security"}

// restoreNFTables removes the tables that appeared during the run and are the cluster's:
// kube-proxy's own, and iptables-nft's tables left empty once the cluster's rules are gone
// (restoreIptables runs first). Others are reported and left alone.
func restoreNFTables(before []string, logf func(string, ...any)) error {
	if before == nil {
		return nil // a record from before the tables were recorded
	}
	now, err := nftTables()
	if err != nil {
		return err
	}
	var errs []error
	for _, t := range now {
		if slices.Contains(before, t) {
			continue
		}
		family, name, _ := strings.Cut(t, " ")
		del := name == "kube-proxy" && (family == "ip" || family == "ip6")
		if !del && (family == "ip" || family == "ip6") && slices.Contains(iptablesNFTTables, name) {
			n, err := nftRules(family, name)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			del = n == 0
		}
		if !del {
			logf("nftables: table %s appeared during the run and is not the cluster's (or not empty); left alone", t)
			continue
		}
		if out, err := exec.Command("nft", "delete", "table", family, name).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("nft delete table %s: %v: %s", t, err, strings.TrimSpace(string(out))))
		}
	}
	return errors.Join(errs...)
}

// nftRules counts the rules in a table.
func nftRules(family, name string) (int, error) {
	out, err := exec.Command("nft", "-j", "list", "table", family, name).Output()
	if err != nil {
		return 0, fmt.Errorf("nft -j list table %s %s: %w", family, name, err)
	}
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return 0, fmt.Errorf("nft -j list table %s %s: %w", family, name, err)
	}
	n := 0
	for _, o := range doc.Nftables {
		if _, ok := o["rule"]; ok {
			n++
		}
	}
	return n, nil
}
