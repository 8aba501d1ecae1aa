package node

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

func withProxyEnv(p *corev1.Pod, env ...corev1.EnvVar) *corev1.Pod {
	p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: istioProxy, Env: env})
	return p
}

// Node mode takes INVALID_DROP and the owner-group variables from the proxy's environment
// (or its proxy.istio.io/config proxyMetadata), as istio-init gets them.
func TestConfigProxyEnvSettings(t *testing.T) {
	meshed := map[string]string{AnnotationIstioStatus: "{}"}
	cfg, _, err := Config(withProxyEnv(pod(meshed, nil), corev1.EnvVar{Name: "INVALID_DROP", Value: "true"}), policy.Default())
	require.NoError(t, err)
	require.True(t, cfg.DropInvalid)

	cfg, _, err = Config(withProxyEnv(pod(meshed, nil), corev1.EnvVar{Name: "ISTIO_OUTBOUND_OWNER_GROUPS", Value: "1000,2000"}), policy.Default())
	require.NoError(t, err)
	require.Equal(t, policy.OwnerGroups{Only: true, Include: []uint32{1000, 2000}}, cfg.OutboundOwnerGroups)

	annotated := pod(map[string]string{AnnotationIstioStatus: "{}",
		AnnotationProxyConfig: "proxyMetadata:\n  ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: \"3000\"\n"}, nil)
	cfg, _, err = Config(annotated, policy.Default())
	require.NoError(t, err)
	require.Equal(t, []uint32{3000}, cfg.OutboundOwnerGroups.Exclude)

	_, _, err = Config(withProxyEnv(pod(meshed, nil), corev1.EnvVar{Name: "INVALID_DROP", Value: "yes"}), policy.Default())
	require.ErrorContains(t, err, `pod shop/web env INVALID_DROP of container istio-proxy: invalid --drop-invalid "yes"`)

	// A kernel whose programs cannot read the socket's group: the pod is refused, naming
	// where the setting came from.
	saved := checkPolicy
	t.Cleanup(func() { checkPolicy = saved })
	checkPolicy = func(c *policy.Config) error {
		if c.FiltersOwnerGroups() {
			return &loader.PolicyError{Setting: "$ISTIO_OUTBOUND_OWNER_GROUPS", Why: "needs Linux 6.2 or later"}
		}
		return nil
	}
	_, _, err = Config(withProxyEnv(pod(meshed, nil), corev1.EnvVar{Name: "ISTIO_OUTBOUND_OWNER_GROUPS", Value: "1000"}), policy.Default())
	require.ErrorContains(t, err, "pod shop/web: env ISTIO_OUTBOUND_OWNER_GROUPS of container istio-proxy asks for what eBPF cannot do ($ISTIO_OUTBOUND_OWNER_GROUPS: needs Linux 6.2 or later); node mode has no iptables fallback")
}

// Interface annotations are what eBPF cannot do, and node mode has no iptables to fall back
// to: the pod is refused in one line naming the annotation (the kubelet's event carries
// it), never captured with the interfaces' traffic taken too.
func TestConfigInterfaceAnnotationsRefused(t *testing.T) {
	for _, tc := range []struct {
		annotations map[string]string
		want        string
	}{
		{map[string]string{"traffic.sidecar.istio.io/excludeInterfaces": "net1"}, "annotation traffic.sidecar.istio.io/excludeInterfaces asks for what eBPF cannot do (-c/--istio-exclude-interfaces net1: eBPF cannot exclude interfaces"},
		{map[string]string{"traffic.sidecar.istio.io/kubevirtInterfaces": "net1"}, "annotation traffic.sidecar.istio.io/kubevirtInterfaces asks for what eBPF cannot do (-k/--kube-virt-interfaces net1"},
		{map[string]string{"istio.io/reroute-virtual-interfaces": "net2", "traffic.sidecar.istio.io/kubevirtInterfaces": "net1"}, "annotation istio.io/reroute-virtual-interfaces asks for what eBPF cannot do (-k/--kube-virt-interfaces net2"},
		{map[string]string{"traffic.sidecar.istio.io/excludeInterfaces": "net+"}, `annotation traffic.sidecar.istio.io/excludeInterfaces: invalid -c/--istio-exclude-interfaces "net+"`},
	} {
		tc.annotations[AnnotationIstioStatus] = "{}"
		_, _, err := Config(pod(tc.annotations, nil), policy.Default())
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: want one line containing %q, got %v", tc.annotations, tc.want, err)
		}
	}
	// Empty values ask for nothing.
	_, _, err := Config(pod(map[string]string{AnnotationIstioStatus: "{}", "traffic.sidecar.istio.io/excludeInterfaces": ""}, nil), policy.Default())
	require.NoError(t, err)
}
