package node

import (
	"strings"
	"testing"
	"testing/fstest"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshdivert/divert/policy"
)

func pod(annotations, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", UID: "1f2e-33", Annotations: annotations, Labels: labels}}
}

func TestSelected(t *testing.T) {
	injected := map[string]string{AnnotationIstioStatus: `{"initContainers":null}`}
	hostNet := pod(injected, nil)
	hostNet.Spec.HostNetwork = true
	cases := []struct {
		name string
		pod  *corev1.Pod
		want bool
	}{
		{"istio injected", pod(injected, nil), true},
		{"plain pod", pod(nil, nil), false},
		{"opt in by label", pod(nil, map[string]string{LabelCapture: "true"}), true},
		{"opt out beats injection", pod(injected, map[string]string{LabelCapture: "false"}), false},
		{"host network never", hostNet, false},
	}
	for _, c := range cases {
		got, why := Selected(c.pod)
		if got != c.want || why == "" {
			t.Errorf("%s: Selected = %v (%q), want %v", c.name, got, why, c.want)
		}
	}
}

func TestConfigFromAnnotations(t *testing.T) {
	uid, gid := int64(2000), int64(3000)
	p := pod(map[string]string{
		AnnotationIstioStatus:                              "{}",
		"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.96.0.0/12",
		"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.1/32",
		"traffic.sidecar.istio.io/includeOutboundPorts":    "3306",
		"traffic.sidecar.istio.io/excludeOutboundPorts":    "5432,6379",
		"traffic.sidecar.istio.io/includeInboundPorts":     "8080,9090",
		"traffic.sidecar.istio.io/excludeInboundPorts":     "9999",
		AnnotationInterceptionMode:                         "TPROXY",
		"traffic.sidecar.istio.io/somethingNew":            "net1",
	}, nil)
	p.Spec.Containers = []corev1.Container{{Name: "app"}, {Name: "istio-proxy", SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &gid}}}
	cfg, warnings, err := Config(p, policy.Default())
	require.NoError(t, err)
	require.Equal(t, "10.96.0.0/12", cfg.OutboundCIDRs.String())
	require.Equal(t, "10.96.0.1/32", cfg.OutboundExcludeCIDRs[0].String())
	require.Equal(t, []uint16{3306}, cfg.OutboundPorts)
	require.Equal(t, []uint16{5432, 6379}, cfg.OutboundExcludePorts)
	require.Equal(t, "8080,9090", cfg.InboundPorts.String())
	require.Equal(t, []uint16{15090, 15021, 15020, 9999}, cfg.InboundExcludePorts)
	require.Equal(t, policy.TProxy, cfg.Mode)
	require.Equal(t, uint32(2000), cfg.ProxyUID)
	require.Equal(t, uint32(3000), cfg.ProxyGID)
	require.Len(t, warnings, 1)
	require.Contains(t, warnings[0], "somethingNew")
}

// Istio's native sidecar (its default on Kubernetes 1.29+) is istio-proxy as an init
// container with restartPolicy: Always; a uid other than 1337 (OpenShift assigns one) must
// come from there, or the proxy's own connections are captured back to itself.
func TestConfigNativeSidecarProxyIDs(t *testing.T) {
	uid, gid, podUID := int64(1000680000), int64(1000680001), int64(4000)
	always := corev1.ContainerRestartPolicyAlways
	native := func() *corev1.Pod {
		p := pod(map[string]string{AnnotationIstioStatus: "{}"}, nil)
		p.Spec.InitContainers = []corev1.Container{
			{Name: "istio-validation"},
			{Name: "istio-proxy", RestartPolicy: &always, SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &gid}},
		}
		p.Spec.Containers = []corev1.Container{{Name: "app"}}
		return p
	}
	cfg, _, err := Config(native(), policy.Default())
	require.NoError(t, err)
	require.Equal(t, uint32(uid), cfg.ProxyUID)
	require.Equal(t, uint32(gid), cfg.ProxyGID)

	// The uid alone: the gid follows it, as with -u alone.
	p := native()
	p.Spec.InitContainers[1].SecurityContext.RunAsGroup = nil
	cfg, _, err = Config(p, policy.Default())
	require.NoError(t, err)
	require.Equal(t, uint32(uid), cfg.ProxyUID)
	require.Equal(t, uint32(uid), cfg.ProxyGID)

	// Only the pod's securityContext sets it: the proxy runs as the pod's uid.
	p = native()
	p.Spec.InitContainers[1].SecurityContext = nil
	p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsUser: &podUID}
	cfg, _, err = Config(p, policy.Default())
	require.NoError(t, err)
	require.Equal(t, uint32(podUID), cfg.ProxyUID)

	// The container's own setting beats the pod's.
	p = native()
	p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsUser: &podUID}
	cfg, _, err = Config(p, policy.Default())
	require.NoError(t, err)
	require.Equal(t, uint32(uid), cfg.ProxyUID)

	// divert's annotations still win.
	p = native()
	p.Annotations[AnnotationProxyUID] = "2222"
	cfg, _, err = Config(p, policy.Default())
	require.NoError(t, err)
	require.Equal(t, uint32(2222), cfg.ProxyUID)
	require.Equal(t, uint32(gid), cfg.ProxyGID)

	// An init container that runs to completion is not the proxy, whatever its name.
	p = native()
	p.Spec.InitContainers[1].RestartPolicy = nil
	cfg, _, err = Config(p, policy.Default())
	require.NoError(t, err)
	require.Equal(t, uint32(1337), cfg.ProxyUID)
}

func TestConfigDefaultsAndErrors(t *testing.T) {
	cfg, warnings, err := Config(pod(map[string]string{AnnotationIstioStatus: "{}"}, nil), policy.Default())
	require.NoError(t, err)
	require.Empty(t, warnings)
	require.Equal(t, policy.Default(), cfg)

	_, _, err = Config(pod(map[string]string{"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}, nil), policy.Default())
	require.Error(t, err)
	require.Contains(t, err.Error(), "istio-service-exclude-cidr")
	require.NotContains(t, err.Error(), "\n")

	// IPv6 ranges mix with IPv4 ones; a broken one is refused, naming the annotation it
	// came from.
	for _, k := range []string{"traffic.sidecar.istio.io/excludeOutboundIPRanges", "traffic.sidecar.istio.io/includeOutboundIPRanges"} {
		_, _, err = Config(pod(map[string]string{AnnotationIstioStatus: "{}", k: "10.96.0.0/12,fd00:10:96::/112"}, nil), policy.Default())
		require.NoError(t, err)
		_, _, err = Config(pod(map[string]string{AnnotationIstioStatus: "{}", k: "10.96.0.0/12,fd00:10:96::/129"}, nil), policy.Default())
		require.ErrorContains(t, err, "annotation "+k)
		require.ErrorContains(t, err, "0-128")
		require.ErrorContains(t, err, "shop/web")
		require.NotContains(t, err.Error(), "\n")
	}

	_, warnings, err = Config(pod(map[string]string{AnnotationInterceptionMode: "NONE"}, nil), policy.Default())
	require.NoError(t, err)
	require.Len(t, warnings, 1)

	_, _, err = Config(pod(map[string]string{AnnotationProxyUID: "x"}, nil), policy.Default())
	require.ErrorContains(t, err, "proxy-uid")

	// A user namespace moves the proxy's uid as eBPF sees it: refused, not half-captured.
	userns := pod(map[string]string{AnnotationIstioStatus: "{}"}, nil)
	userns.Spec.HostUsers = new(false)
	_, _, err = Config(userns, policy.Default())
	require.ErrorContains(t, err, "hostUsers: false")
	require.NotContains(t, err.Error(), "\n")
}

func TestFindPodCgroup(t *testing.T) {
	const uid = "6c4b2a1e-0d3f-4c5b-9a8e-112233445566"
	u := strings.ReplaceAll(uid, "-", "_")
	layouts := map[string]string{
		"cgroupfs besteffort": "kubepods/besteffort/pod" + uid,
		"cgroupfs burstable":  "kubepods/burstable/pod" + uid,
		"cgroupfs guaranteed": "kubepods/pod" + uid,
		"systemd burstable":   "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + u + ".slice",
		"systemd guaranteed":  "kubepods.slice/kubepods-pod" + u + ".slice",
		"kubelet in a slice":  "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubepods-besteffort-pod" + u + ".slice",
	}
	for name, dir := range layouts {
		fsys := fstest.MapFS{
			dir + "/cgroup.procs":                          {},
			dir + "/0123abcd/cgroup.procs":                 {},
			"kubepods/besteffort/podother/cgroup.procs":    {},
			"system.slice/containerd.service/cgroup.procs": {},
		}
		got, err := FindPodCgroup(fsys, uid)
		if err != nil || got != dir {
			t.Errorf("%s: FindPodCgroup = %q, %v; want %q", name, got, err, dir)
		}
	}
	_, err := FindPodCgroup(fstest.MapFS{"kubepods/besteffort/podother/x": {}}, uid)
	require.ErrorIs(t, err, ErrNoCgroup)
}

func TestExpectedPodCgroup(t *testing.T) {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{UID: types.UID("abc")}}
	for qos, want := range map[corev1.PodQOSClass]string{
		corev1.PodQOSBestEffort: "kubepods/besteffort/podabc",
		corev1.PodQOSBurstable:  "kubepods/burstable/podabc",
		corev1.PodQOSGuaranteed: "kubepods/podabc",
	} {
		p.Status.QOSClass = qos
		require.Equal(t, want, ExpectedPodCgroup(p))
	}
}
