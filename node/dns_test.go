package node

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshdivert/divert/policy"
)

// DNS capture is decided per pod as istio-cni decides it: ISTIO_META_DNS_CAPTURE in the
// istio-proxy container's env (regular or native sidecar), overridden by the pod's
// proxy.istio.io/config proxyMetadata; when on, every destination's port 53 is captured
// (istio-cni reads no resolv.conf).
func TestConfigDNSCapture(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	withEnv := func(p *corev1.Pod, native bool, value string) *corev1.Pod {
		c := corev1.Container{Name: istioProxy, Env: []corev1.EnvVar{{Name: "OTHER", Value: "x"}, {Name: DNSCaptureEnv, Value: value}}}
		if native {
			c.RestartPolicy = &always
			p.Spec.InitContainers = append(p.Spec.InitContainers, c)
		} else {
			p.Spec.Containers = append(p.Spec.Containers, c)
		}
		return p
	}
	annotated := func(cfg string) *corev1.Pod {
		return pod(map[string]string{AnnotationIstioStatus: "{}", AnnotationProxyConfig: cfg}, nil)
	}
	for _, tc := range []struct {
		name string
		pod  *corev1.Pod
		on   bool
	}{
		{"no setting: off", pod(map[string]string{AnnotationIstioStatus: "{}"}, nil), false},
		{"env true", withEnv(pod(nil, nil), false, "true"), true},
		{"env on a native sidecar", withEnv(pod(nil, nil), true, "true"), true},
		{"env false", withEnv(pod(nil, nil), false, "false"), false},
		{"annotation YAML", annotated("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"), true},
		{"annotation JSON", annotated(`{"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true"}}`), true},
		{"annotation without the key", annotated("holdApplicationUntilProxyStarts: true\n"), false},
		{"annotation overrides env", withEnv(annotated("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n"), false, "true"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _, err := Config(tc.pod, policy.Default())
			if err != nil {
				t.Fatal(err)
			}
			if cfg.RedirectDNS != tc.on || cfg.CaptureAllDNS != tc.on || cfg.CapturesDNS() != tc.on || len(cfg.DNSServers) != 0 {
				t.Errorf("RedirectDNS %v CaptureAllDNS %v servers %v, want DNS capture %v of every destination",
					cfg.RedirectDNS, cfg.CaptureAllDNS, cfg.DNSServers, tc.on)
			}
		})
	}
	for _, tc := range []struct {
		pod  *corev1.Pod
		want string
	}{
		{withEnv(pod(nil, nil), false, "yes"), `env ISTIO_META_DNS_CAPTURE of container istio-proxy="yes": use true or false`},
		{annotated("proxyMetadata: [1, 2"), "annotation proxy.istio.io/config is not a ProxyConfig"},
		{annotated("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: maybe\n"), `annotation proxy.istio.io/config proxyMetadata ISTIO_META_DNS_CAPTURE="maybe"`},
	} {
		_, _, err := Config(tc.pod, policy.Default())
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("want one line containing %q, got %v", tc.want, err)
		}
	}
}
