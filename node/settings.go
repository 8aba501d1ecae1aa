package node

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshdivert/divert/policy"
)

// proxyEnvFlags are the settings node mode takes from the proxy's environment, as
// istio-init gets them (the injector gives it the mesh's proxyMetadata, which the proxy
// gets too): the flag each sets.
//
// INVALID_DROP and ISTIO_DUAL_STACK are also what istio-cni reads there. istio-cni reads the owner-group
// variables from its own process, not from the pod, so it never applies a pod's; divert
// applies them, as istio-init would for the same pod.
var proxyEnvFlags = []struct{ env, flag string }{
	{policy.EnvInvalidDrop, policy.FlagDropInvalid},
	{DualStackEnv, policy.FlagDualStack}, // istio-cni reads it there too
	{policy.EnvVar(policy.FlagOwnerGroups), policy.FlagOwnerGroups},
	{policy.EnvVar(policy.FlagOwnerGroupsExclude), policy.FlagOwnerGroupsExclude},
}

// proxyEnvSettings turns the proxy's environment into flags ("--flag=value") and where
// each came from.
func proxyEnvSettings(pod *corev1.Pod) (args, sources []string, err error) {
	for _, s := range proxyEnvFlags {
		value, source, err := proxyEnv(pod, s.env)
		if err != nil {
			return nil, nil, err
		}
		if source != "" {
			args, sources = append(args, "--"+s.flag+"="+value), append(sources, source)
		}
	}
	return args, sources, nil
}

// proxyEnv finds an environment variable of the istio-proxy container (regular or native
// sidecar), overridden by the pod's proxy.istio.io/config proxyMetadata, and says where
// it came from ("" when nowhere).
func proxyEnv(pod *corev1.Pod, name string) (value, source string, err error) {
	for _, c := range proxyContainers(pod) {
		for _, e := range c.Env {
			if e.Name == name {
				value, source = e.Value, fmt.Sprintf("env %s of container %s", name, c.Name)
			}
		}
	}
	if raw, ok := pod.Annotations[AnnotationProxyConfig]; ok {
		var pc struct {
			ProxyMetadata map[string]string `json:"proxyMetadata"`
		}
		if err := yaml.Unmarshal([]byte(raw), &pc); err != nil {
			return "", "", fmt.Errorf("annotation %s is not a ProxyConfig: %v; fix its YAML", AnnotationProxyConfig, err)
		}
		if v, ok := pc.ProxyMetadata[name]; ok {
			value, source = v, fmt.Sprintf("annotation %s proxyMetadata %s", AnnotationProxyConfig, name)
		}
	}
	return value, source, nil
}
