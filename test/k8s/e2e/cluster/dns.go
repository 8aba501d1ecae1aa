package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// Cluster DNS: CoreDNS (built by Build from the Go module proxy) as kubeadm deploys it: a
// Deployment in kube-system behind the kube-dns Service at DNSServiceIP, which the kubelet
// gives every pod as its nameserver (clusterDNS), with the kubernetes plugin answering
// Service and pod names from the API through its own ServiceAccount.
const (
	DNSServiceIP  = "10.96.0.10"
	ClusterDomain = "cluster.local"
	CoreDNSImage  = "divert.test/coredns:e2e"
	// DNSProbeName is a name CoreDNS answers itself with DNSProbeCoreDNS (its hosts
	// plugin), so a query's answer tells whether CoreDNS or something in between (a
	// mesh's DNS agent answering the name with another address) answered it.
	DNSProbeName    = "whoami.divert.test"
	DNSProbeCoreDNS = "192.0.2.53"
)

// corefile: no forward plugin, so nothing is ever asked outside the cluster: names that are
// neither the probe nor cluster.local get SERVFAIL. log writes one line per query (the
// client's address and the name), which the tests read to see who asked.
var corefile = `.:53 {
    errors
    log
    health :8080
    ready :8181
    hosts {
        ` + DNSProbeCoreDNS + ` ` + DNSProbeName + `
        fallthrough
    }
    kubernetes ` + ClusterDomain + ` in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    cache 30
}
`

type object = map[string]any

// dnsObjects are kubeadm's CoreDNS objects, trimmed: ServiceAccount, ClusterRole and
// binding (what the kubernetes plugin lists and watches), the Corefile, the Deployment
// (root with only NET_BIND_SERVICE, for port 53: the image's binary has no file
// capabilities), the kube-dns Service.
func dnsObjects() []object {
	labels := object{"k8s-app": "kube-dns"}
	meta := func(name string) object {
		return object{"name": name, "namespace": "kube-system", "labels": labels}
	}
	return []object{
		{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("coredns")},
		{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": object{"name": "system:coredns"},
			"rules": []object{
				{"apiGroups": []string{""}, "resources": []string{"endpoints", "services", "pods", "namespaces"}, "verbs": []string{"list", "watch"}},
				{"apiGroups": []string{"discovery.k8s.io"}, "resources": []string{"endpointslices"}, "verbs": []string{"list", "watch"}},
			}},
		{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": object{"name": "system:coredns"},
			"roleRef":  object{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
			"subjects": []object{{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}}},
		{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("coredns"), "data": object{"Corefile": corefile}},
		{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("coredns"), "spec": object{
			"replicas": 1,
			"selector": object{"matchLabels": labels},
			"template": object{"metadata": object{"labels": labels}, "spec": object{
				"serviceAccountName":            "coredns",
				"dnsPolicy":                     "Default",
				"terminationGracePeriodSeconds": 1,
				"containers": []object{{
					"name": "coredns", "image": CoreDNSImage, "imagePullPolicy": "Never",
					"args": []string{"-conf", "/etc/coredns/Corefile"},
					"ports": []object{
						{"name": "dns", "containerPort": 53, "protocol": "UDP"},
						{"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
					},
					"readinessProbe": object{"httpGet": object{"path": "/ready", "port": 8181}, "periodSeconds": 1},
					"livenessProbe":  object{"httpGet": object{"path": "/health", "port": 8080}, "periodSeconds": 10},
					"securityContext": object{"runAsUser": 0, "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
						"capabilities": object{"drop": []string{"ALL"}, "add": []string{"NET_BIND_SERVICE"}}},
					"volumeMounts": []object{{"name": "config", "mountPath": "/etc/coredns", "readOnly": true}},
				}},
				"volumes": []object{{"name": "config", "configMap": object{"name": "coredns"}}},
			}},
		}},
		{"apiVersion": "v1", "kind": "Service", "metadata": meta("kube-dns"), "spec": object{
			"selector": labels, "clusterIP": DNSServiceIP,
			"ports": []object{
				{"name": "dns", "port": 53, "protocol": "UDP"},
				{"name": "dns-tcp", "port": 53, "protocol": "TCP"},
			},
		}},
	}
}

// InstallDNS applies the CoreDNS objects; WaitDNS waits for them to serve.
func (c *Cluster) InstallDNS(ctx context.Context) error {
	b, err := json.Marshal(object{"apiVersion": "v1", "kind": "List", "items": dnsObjects()})
	if err != nil {
		return err
	}
	if _, err := c.KubectlIn(ctx, string(b), "apply", "-f", "-"); err != nil {
		return fmt.Errorf("installing CoreDNS: %w", err)
	}
	return nil
}

// WaitDNS waits until CoreDNS is ready (its ready plugin: the kubernetes plugin has synced)
// and kube-proxy serves the kube-dns Service.
func (c *Cluster) WaitDNS(ctx context.Context) error {
	if _, err := c.Kubectl(ctx, "wait", "-n", "kube-system", "--for=condition=Ready", "pod", "-l", "k8s-app=kube-dns", "--timeout=120s"); err != nil {
		logs, _ := c.Kubectl(ctx, "logs", "-n", "kube-system", "-l", "k8s-app=kube-dns", "--tail=20")
		return fmt.Errorf("CoreDNS not ready: %w\n%s", err, logs)
	}
	return c.WaitFor(ctx, "kube-proxy serving kube-dns", 30*time.Second, func() error { return c.ProxyServes(DNSServiceIP) })
}
