package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	kyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/meshdivert/divert/tools/helm/nodemanifest"
)

var (
	chart    = filepath.Join("..", "..", "deploy", "helm", "divert")
	manifest = filepath.Join("..", "..", "deploy", "node", "divert-node.yaml")
)

// decoder reads YAML into the built-in Kubernetes types strictly: an unknown or duplicate
// field fails, as the API server's strict field validation would.
var decoder = kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
	kjson.SerializerOptions{Yaml: true, Strict: true})

// serviceMonitor is the part of monitoring.coreos.com/v1 ServiceMonitor the chart sets,
// decoded strictly (the Prometheus Operator's types are not in client-go's scheme).
type serviceMonitor struct {
	APIVersion string             `json:"apiVersion"`
	Kind       string             `json:"kind"`
	Metadata   metadata           `json:"metadata"`
	Spec       serviceMonitorSpec `json:"spec"`
}

type metadata struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
}

type serviceMonitorSpec struct {
	Selector struct {
		MatchLabels map[string]string `json:"matchLabels"`
	} `json:"selector"`
	NamespaceSelector struct {
		MatchNames []string `json:"matchNames"`
	} `json:"namespaceSelector"`
	Endpoints []struct {
		Port          string `json:"port"`
		Path          string `json:"path"`
		Interval      string `json:"interval"`
		ScrapeTimeout string `json:"scrapeTimeout"`
		Relabelings   []struct {
			SourceLabels []string `json:"sourceLabels"`
			TargetLabel  string   `json:"targetLabel"`
		} `json:"relabelings"`
	} `json:"endpoints"`
}

// objects is a rendering decoded: built-in objects by "Kind/name", ServiceMonitors apart.
type objects struct {
	byName   map[string]runtime.Object
	monitors []serviceMonitor
}

func decode(t *testing.T, text []byte) objects {
	t.Helper()
	objs := objects{byName: map[string]runtime.Object{}}
	r := kyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(text)))
	for {
		doc, err := r.Read()
		if err != nil {
			break
		}
		var head struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := kyaml.Unmarshal(doc, &head); err != nil {
			t.Fatal(err)
		}
		if head.Kind == "" {
			continue // comments only
		}
		if head.Kind == "ServiceMonitor" {
			js, err := kyaml.ToJSON(doc)
			if err != nil {
				t.Fatal(err)
			}
			dec := json.NewDecoder(bytes.NewReader(js))
			dec.DisallowUnknownFields()
			var sm serviceMonitor
			if err := dec.Decode(&sm); err != nil {
				t.Fatalf("ServiceMonitor %s: %v\n%s", head.Metadata.Name, err, doc)
			}
			objs.monitors = append(objs.monitors, sm)
			continue
		}
		obj, _, err := decoder.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("not a strict Kubernetes object: %v\n%s", err, doc)
		}
		key := head.Kind + "/" + head.Metadata.Name
		if _, dup := objs.byName[key]; dup {
			t.Fatalf("%s rendered twice", key)
		}
		objs.byName[key] = obj
	}
	return objs
}

// The raw manifest is the chart's default rendering, byte for byte (make manifests).
func TestNodeManifestIsTheChart(t *testing.T) {
	want, err := nodemanifest.Render(chart)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s is not what make manifests renders from %s: run make manifests", manifest, chart)
	}
	objs := decode(t, got)
	if _, ok := objs.byName["Namespace/"+nodemanifest.Namespace].(*corev1.Namespace); !ok {
		t.Errorf("%s has no Namespace %s", manifest, nodemanifest.Namespace)
	}
}

// The default values: what the raw manifest always had (names, flags, host paths), every
// object strict.
func TestDefaultValues(t *testing.T) {
	out, err := nodemanifest.Template(chart)
	if err != nil {
		t.Fatal(err)
	}
	objs := decode(t, out)
	ds := daemonSet(t, objs, "divert-node")
	c := ds.Spec.Template.Spec.Containers[0]
	if c.Image != "ghcr.io/meshdivert/divert:"+appVersion(t) || c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("image %s %s, want the chart's appVersion, IfNotPresent", c.Image, c.ImagePullPolicy)
	}
	wantArgs := []string{
		"--cgroup-root=/host/sys/fs/cgroup", "--bpffs=/sys/fs/bpf", "--cni-bin-dir=/host/cni/bin",
		"--cni-conf-dir=/host/cni/net.d", "--socket=/var/run/divert/cni.sock", "--metrics-addr=:15099",
		"--exclude-namespaces=kube-system", "--fail-open=false", "--uninstall-on-exit=auto",
		"--reconcile-interval=30s", "--remove-istio-iptables=true",
	}
	if !slices.Equal(c.Args, wantArgs) {
		t.Errorf("args\n%q\nwant\n%q", c.Args, wantArgs)
	}
	wantHost := map[string]string{"cgroup": "/sys/fs/cgroup", "bpffs": "/sys/fs/bpf", "cni-bin": "/opt/cni/bin",
		"cni-conf": "/etc/cni/net.d", "socket-dir": "/var/run/divert", "netns": "/var/run/netns"}
	checkHostPaths(t, ds, wantHost)
	spec := ds.Spec.Template.Spec
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.PriorityClassName != "system-node-critical" {
		t.Errorf("the agent must run on every node: tolerations %v, priority %q", spec.Tolerations, spec.PriorityClassName)
	}
	if len(c.Resources.Requests)+len(c.Resources.Limits) != 0 {
		t.Errorf("resources %v, want none by default", c.Resources)
	}
	for _, name := range []string{"ServiceAccount/divert-node", "ClusterRole/divert-node", "ClusterRoleBinding/divert-node",
		"Role/divert-node", "RoleBinding/divert-node", "ConfigMap/divert-node"} {
		if objs.byName[name] == nil {
			t.Errorf("no %s", name)
		}
	}
	if len(objs.monitors) != 0 || objs.byName["Service/divert-node-metrics"] != nil {
		t.Errorf("a ServiceMonitor and its Service by default: the Prometheus Operator's CRDs may be missing")
	}
}

// A values file that changes every setting: each lands in the objects.
func TestNonDefaultValues(t *testing.T) {
	out, err := nodemanifest.Template(chart, "-f", filepath.Join("testdata", "custom-values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	objs := decode(t, out)
	ds := daemonSet(t, objs, "mesh-agent")
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	if c.Image != "registry.example.com/mesh/divert:0.2.0-rc1@"+digest || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("image %s %s", c.Image, c.ImagePullPolicy)
	}
	if len(spec.ImagePullSecrets) != 1 || spec.ImagePullSecrets[0].Name != "regcred" {
		t.Errorf("imagePullSecrets %v", spec.ImagePullSecrets)
	}
	for _, want := range []string{"--socket=/run/divert/cni.sock", "--metrics-addr=:19099",
		"--exclude-namespaces=kube-system,istio-system,monitoring", "--fail-open=true",
		"--uninstall-on-exit=never", "--reconcile-interval=1m30s", "--remove-istio-iptables=false"} {
		if !slices.Contains(c.Args, want) {
			t.Errorf("args %q lack %q", c.Args, want)
		}
	}
	checkHostPaths(t, ds, map[string]string{"cgroup": "/sys/fs/cgroup/unified", "bpffs": "/run/bpf",
		"cni-bin": "/var/lib/rancher/k3s/data/current/bin", "cni-conf": "/var/lib/rancher/k3s/agent/etc/cni/net.d",
		"socket-dir": "/run/divert", "netns": "/run/netns"})
	if len(c.Ports) != 1 || c.Ports[0].ContainerPort != 19099 {
		t.Errorf("ports %v, want metrics on 19099", c.Ports)
	}
	if c.Resources.Requests.Cpu().String() != "10m" || c.Resources.Limits.Memory().String() != "256Mi" {
		t.Errorf("resources %v", c.Resources)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Key != "node-role.kubernetes.io/control-plane" ||
		spec.NodeSelector["kubernetes.io/os"] != "linux" || spec.Affinity == nil || spec.PriorityClassName != "" {
		t.Errorf("scheduling: tolerations %v, nodeSelector %v, affinity %v, priority %q", spec.Tolerations, spec.NodeSelector, spec.Affinity, spec.PriorityClassName)
	}
	if ds.Spec.Template.Labels["team"] != "mesh" || ds.Spec.Template.Annotations["example.com/team"] != "mesh" {
		t.Errorf("pod labels %v, annotations %v", ds.Spec.Template.Labels, ds.Spec.Template.Annotations)
	}
	if ds.Spec.UpdateStrategy.RollingUpdate == nil || ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable.String() != "25%" {
		t.Errorf("updateStrategy %v", ds.Spec.UpdateStrategy)
	}
	var env []string
	for _, e := range c.Env {
		env = append(env, e.Name+"="+e.Value)
	}
	if !slices.Contains(env, "KUBERNETES_SERVICE_HOST=api.internal.example.com") {
		t.Errorf("env %v", env)
	}
	cm := objs.byName["ConfigMap/mesh-agent"].(*corev1.ConfigMap)
	if cm.Data["PROXY_UID"] != "2000" || cm.Data["ISTIO_LOCAL_EXCLUDE_PORTS"] != "15090,15021,15020,9901" {
		t.Errorf("policy ConfigMap %v", cm.Data)
	}
	// never: the agent reads no DaemonSet, so it gets no Role for it.
	if objs.byName["Role/mesh-agent"] != nil || objs.byName["RoleBinding/mesh-agent"] != nil {
		t.Errorf("uninstallOnExit never still grants reading the DaemonSet")
	}
	crb := objs.byName["ClusterRoleBinding/mesh-agent"].(*rbacv1.ClusterRoleBinding)
	if crb.Subjects[0].Name != spec.ServiceAccountName || crb.Subjects[0].Namespace != nodemanifest.Namespace {
		t.Errorf("ClusterRoleBinding subject %v, agent's service account %s", crb.Subjects, spec.ServiceAccountName)
	}
	svc, ok := objs.byName["Service/mesh-agent-metrics"].(*corev1.Service)
	if !ok || svc.Spec.ClusterIP != "None" || svc.Spec.Ports[0].Port != 19099 || svc.Spec.Ports[0].TargetPort.String() != "metrics" ||
		svc.Spec.Selector["app"] != ds.Spec.Selector.MatchLabels["app"] {
		t.Fatalf("metrics Service %+v", svc)
	}
	if len(objs.monitors) != 1 {
		t.Fatalf("want one ServiceMonitor, got %d", len(objs.monitors))
	}
	sm := objs.monitors[0]
	if sm.APIVersion != "monitoring.coreos.com/v1" || sm.Metadata.Labels["release"] != "kube-prometheus-stack" ||
		sm.Spec.Selector.MatchLabels["app"] != svc.Labels["app"] || len(sm.Spec.Endpoints) != 1 ||
		sm.Spec.Endpoints[0].Port != "metrics" || sm.Spec.Endpoints[0].Interval != "15s" || sm.Spec.Endpoints[0].ScrapeTimeout != "5s" ||
		!slices.Equal(sm.Spec.NamespaceSelector.MatchNames, []string{nodemanifest.Namespace}) {
		t.Errorf("ServiceMonitor %+v", sm)
	}
}

// Bad values fail helm before anything reaches a cluster, naming the setting.
func TestBadValues(t *testing.T) {
	for _, tc := range []struct {
		set, want string
	}{
		{"failopen=true", "failopen"}, // misspelt: the schema allows no unknown keys
		{"uninstallOnExit=sometimes", "uninstallOnExit"},
		{"cni.binDir=opt/cni/bin", "binDir"}, // a host path is absolute
		{"metrics.port=0,metrics.serviceMonitor.enabled=true", "metrics.port"},
		{"image.digest=0123", "digest"},
	} {
		_, err := nodemanifest.Template(chart, "--set", tc.set)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("--set %s: %v, want an error naming %s", tc.set, err, tc.want)
		}
	}
}

func daemonSet(t *testing.T, objs objects, name string) *appsv1.DaemonSet {
	t.Helper()
	ds, ok := objs.byName["DaemonSet/"+name].(*appsv1.DaemonSet)
	if !ok {
		t.Fatalf("no DaemonSet %s", name)
	}
	if ds.Namespace != nodemanifest.Namespace || ds.Spec.Template.Spec.ServiceAccountName != name {
		t.Errorf("DaemonSet in %q with service account %q", ds.Namespace, ds.Spec.Template.Spec.ServiceAccountName)
	}
	if c := ds.Spec.Template.Spec.Containers[0]; c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Errorf("the agent must be privileged")
	}
	return ds
}

// checkHostPaths: each volume's host path, and the socket and netns dirs mounted at their
// host path (the plugin on the host names them to the agent).
func checkHostPaths(t *testing.T, ds *appsv1.DaemonSet, want map[string]string) {
	t.Helper()
	got := map[string]string{}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil {
			got[v.Name] = v.HostPath.Path
		}
	}
	for name, path := range want {
		if got[name] != path {
			t.Errorf("volume %s: hostPath %q, want %q", name, got[name], path)
		}
	}
	for _, m := range ds.Spec.Template.Spec.Containers[0].VolumeMounts {
		if (m.Name == "socket-dir" || m.Name == "netns") && m.MountPath != want[m.Name] {
			t.Errorf("%s mounted at %s, want its host path %s", m.Name, m.MountPath, want[m.Name])
		}
		if m.Name == "bpffs" && (m.MountPath != "/sys/fs/bpf" || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional) {
			t.Errorf("bpffs mounted at %s (%v), want /sys/fs/bpf Bidirectional", m.MountPath, m.MountPropagation)
		}
	}
}

func appVersion(t *testing.T) string {
	b, err := os.ReadFile(filepath.Join(chart, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "appVersion:"); ok {
			return strings.Trim(strings.TrimSpace(v), `"`)
		}
	}
	t.Fatal("Chart.yaml has no appVersion")
	return ""
}

// helm lint --strict: the chart's own checks, warnings included, on both values files.
func TestLint(t *testing.T) {
	for _, extra := range [][]string{nil, {"-f", filepath.Join("testdata", "custom-values.yaml")}} {
		out, err := nodemanifest.Helm(append([]string{"lint", "--strict", chart}, extra...)...)
		if err != nil || !strings.Contains(string(out), "0 chart(s) failed") {
			t.Errorf("helm lint --strict %v: %v\n%s", extra, err, out)
		}
	}
}
