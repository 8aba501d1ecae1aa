package cluster

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// PauseImage is the sandbox image containerd is told to use; the harness builds and
// imports it (there is no registry to pull registry.k8s.io/pause from).
const PauseImage = "divert.test/pause:e2e"

func (c *Cluster) writeConfigs() error {
	for _, d := range []string{"pki", "containerd", "cni/net.d", "cni/bin", "cni/ipam", "kubelet/root", "kubelet/pki", "pod-logs", "runc", "kube-proxy"} {
		if err := os.MkdirAll(c.path(d), 0o755); err != nil {
			return err
		}
	}
	plugins, err := filepath.Glob("/usr/lib/cni/*")
	if err != nil {
		return err
	}
	for _, p := range plugins {
		if err := os.Symlink(p, filepath.Join(c.CNIBinDir, filepath.Base(p))); err != nil {
			return err
		}
	}
	if err := c.writePKI(); err != nil {
		return err
	}
	files := map[string]string{
		"containerd/config.toml":   c.containerdConfig(),
		"cni/net.d/" + CNIConflist: c.cniConfig(),
		"kubelet/config.yaml":      c.kubeletConfig(),
	}
	for _, m := range []string{ProxyIPTables, ProxyNFTables} {
		files["kube-proxy/"+m+".yaml"] = c.kubeProxyConfig(m)
	}
	for p, content := range files {
		if err := os.WriteFile(c.path(p), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (c *Cluster) writePKI() error {
	p, err := newPKI(c.path("pki"))
	if err != nil {
		return err
	}
	// The serving certificate covers every name an in-cluster or host client may use: the
	// kubernetes Service's ClusterIP (through kube-proxy), its DNS names, the node address.
	apiIPs := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(c.NodeIP), net.ParseIP("10.96.0.1")}
	apiNames := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	certs := []struct {
		name, cn string
		groups   []string
		server   bool
	}{
		{"apiserver", "kube-apiserver", nil, true},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, false},
		{"admin", "divert-e2e-admin", []string{"system:masters"}, false},
		{"controller-manager", "system:kube-controller-manager", nil, false},
		{"scheduler", "system:kube-scheduler", nil, false},
		{"kubelet", "system:node:" + NodeName, []string{"system:nodes"}, false},
		// The user Kubernetes' default ClusterRoleBinding system:node-proxier names.
		{"kube-proxy", "system:kube-proxy", nil, false},
	}
	for _, ct := range certs {
		var ips []net.IP
		var dns []string
		if ct.server {
			ips, dns = apiIPs, apiNames
		}
		if err := p.issue(ct.name, ct.cn, ct.groups, ct.server, ips, dns); err != nil {
			return err
		}
	}
	if err := p.serviceAccountKey(); err != nil {
		return err
	}
	local := fmt.Sprintf("https://127.0.0.1:%d", APIPort)
	for file, cert := range map[string]string{
		"admin.kubeconfig":              "admin",
		"controller-manager.kubeconfig": "controller-manager",
		"scheduler.kubeconfig":          "scheduler",
		"kubelet.kubeconfig":            "kubelet",
		"kube-proxy.kubeconfig":         "kube-proxy",
	} {
		if err := p.kubeconfig(c.path(file), local, cert); err != nil {
			return err
		}
	}
	return nil
}

// containerdConfig keeps root, state, socket and runc's state under the state directory.
// restrict_oom_score_adj is required here: root lacks CAP_SYS_RESOURCE, and without it
// every sandbox fails with "can't get final child's PID from pipe: EOF".
// netns_mounts_under_state_dir keeps pod netns files under the state directory too.
func (c *Cluster) containerdConfig() string {
	return fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = %q
        SystemdCgroup = false
`, c.path("containerd", "root"), c.path("containerd", "state"), c.ContainerdSock,
		c.path("containerd", "containerd-ttrpc.sock"), c.path("containerd", "opt"), PauseImage,
		c.CNIBinDir, c.CNIConfDir, c.path("runc"))
}

// cniConfig is a plain bridge with host-local addresses, one range per family (IPv4
// first: the kubelet lists the node's family first anyway). isGateway gives pods a route
// to the host in each family (and sets ip_forward and net.ipv6.conf.all.forwarding,
// restored at teardown); no ipMasq, so the plugin writes no iptables rules: pods only
// talk to each other and to the host.
func (c *Cluster) cniConfig() string {
	return fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": %q,
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q, "gateway": %q}], [{"subnet": %q, "gateway": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
      }
    }
  ]
}
`, CNINetwork, Bridge, c.path("cni", "ipam"), PodCIDR, PodGateway, PodCIDR6, PodGateway6)
}

// kubeletConfig: cgroupfs because /sys/fs/cgroup is a tmpfs (cgroup v1 layout) and there
// is no systemd; failCgroupV1 and failSwapOn false for the same machines;
// makeIPTablesUtilChains false or the kubelet adds KUBE-FIREWALL DROP rules to the host.
// Eviction and image GC thresholds are out of reach so a full disk on a CI machine cannot
// evict test pods or collect the imported images (there is nothing to pull them from).
// clusterDNS is CoreDNS's Service (dns.go): pods get it as their only nameserver.
func (c *Cluster) kubeletConfig() string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix://%s
podLogsDir: %s
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: %s
authorization:
  mode: AlwaysAllow
readOnlyPort: 0
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: /etc/resolv.conf
clusterDNS: [%q]
clusterDomain: %s
`, c.ContainerdSock, c.path("pod-logs"), filepath.Join(c.path("pki"), "ca.crt"), DNSServiceIP, ClusterDomain)
}

// CNIConflist is the cluster's network configuration in CNIConfDir (bridge with
// host-local addresses), the only one: node mode chains divert-cni into it.
const CNIConflist = "10-divert-e2e.conflist"
