// Package node is divert's node mode: an agent (one per node, run by a DaemonSet) that a
// chained CNI plugin calls for every pod, and that attaches divert to the pods that run a
// sidecar, configured from their Istio annotations. Kubernetes stays here and in cmd/; the
// loader knows only cgroups, network namespaces and policy.
package node

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// Annotations and labels that decide and shape capture.
const (
	// AnnotationIstioStatus is set by Istio's sidecar injector on injected pods.
	AnnotationIstioStatus = "sidecar.istio.io/status"
	// AnnotationInterceptionMode is Istio's REDIRECT / TPROXY choice.
	AnnotationInterceptionMode = "sidecar.istio.io/interceptionMode"
	// LabelCapture opts a pod in (or out, with "false") without Istio.
	LabelCapture = "divert.meshdivert.io/capture"
	// AnnotationProxyUID and AnnotationProxyGID override the proxy's uid and gid.
	AnnotationProxyUID = "divert.meshdivert.io/proxy-uid"
	AnnotationProxyGID = "divert.meshdivert.io/proxy-gid"

	// AnnotationProxyConfig is Istio's per-pod ProxyConfig (YAML or JSON); its
	// proxyMetadata holds environment variables for the proxy, such as DNSCaptureEnv.
	AnnotationProxyConfig = "proxy.istio.io/config"
	// DNSCaptureEnv turns on istio-agent's DNS proxy, and so DNS capture.
	DNSCaptureEnv = policy.EnvDNSCapture
	// DualStackEnv turns dual stack on: a pod with an IPv6 address has its IPv6 captured
	// too (istio-cni reads it from the istio-proxy container, as DNSCaptureEnv).
	DualStackEnv = policy.EnvDualStack

	trafficPrefix = "traffic.sidecar.istio.io/"
	// istioProxy is the injected sidecar container's name.
	istioProxy = "istio-proxy"
)

// trafficAnnotations maps Istio's per-pod traffic annotations to the istio-iptables flag
// they set, exactly as Istio's injector renders them into istio-init's arguments.
var trafficAnnotations = map[string]string{
	trafficPrefix + "includeOutboundIPRanges": "-i",
	trafficPrefix + "excludeOutboundIPRanges": "-x",
	trafficPrefix + "includeOutboundPorts":    "-q",
	trafficPrefix + "excludeOutboundPorts":    "-o",
	trafficPrefix + "includeInboundPorts":     "-b",
	trafficPrefix + "excludeInboundPorts":     "-d",
	trafficPrefix + "excludeInterfaces":       "-c",
	trafficPrefix + "kubevirtInterfaces":      "-k", // deprecated by AnnotationRerouteVirtual
	AnnotationRerouteVirtual:                  "-k",
}

// AnnotationRerouteVirtual is Istio's current name for kubevirtInterfaces; Istio's injector
// and istio-cni take it over the old one when both are set.
const AnnotationRerouteVirtual = "istio.io/reroute-virtual-interfaces"

// Selected says whether divert should capture the pod, and why (for logs and events).
func Selected(pod *corev1.Pod) (bool, string) {
	if pod.Spec.HostNetwork {
		return false, "host-network pod"
	}
	switch pod.Labels[LabelCapture] {
	case "false":
		return false, "label " + LabelCapture + "=false"
	case "true":
		return true, "label " + LabelCapture + "=true"
	}
	if _, ok := pod.Annotations[AnnotationIstioStatus]; ok {
		return true, "Istio sidecar injected (" + AnnotationIstioStatus + ")"
	}
	return false, "no sidecar (" + AnnotationIstioStatus + " absent) and no " + LabelCapture + " label"
}

// Config is the policy for a selected pod: defaults, then its annotations, parsed by the
// same flag parser as the CLI so every value is validated the same way. Annotations that
// cannot be honoured come back as warnings, never silently dropped; an annotation with a
// bad value is an error.
func Config(pod *corev1.Pod, defaults policy.Config) (policy.Config, []string, error) {
	if pod.Spec.HostUsers != nil && !*pod.Spec.HostUsers {
		// eBPF sees the proxy's uid as the host maps it, not -u: the proxy's own
		// connections would be captured back to itself.
		return policy.Config{}, nil, fmt.Errorf("pod %s/%s runs in a user namespace (hostUsers: false), which node mode cannot capture correctly: "+
			"drop hostUsers: false, or use divert as the pod's init container (it falls back to iptables there)", pod.Namespace, pod.Name)
	}
	var args, warnings []string
	var sources []string // for each arg, where its value came from
	keys := make([]string, 0, len(pod.Annotations))
	for k := range pod.Annotations {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := pod.Annotations[k]
		if _, newer := pod.Annotations[AnnotationRerouteVirtual]; newer && k == trafficPrefix+"kubevirtInterfaces" {
			continue
		}
		if flag, ok := trafficAnnotations[k]; ok {
			if flag == "-d" {
				// Istio's injector always excludes its own ports, whatever the annotation adds.
				v = strings.Trim(policy.PortList{Ports: policy.InjectorInboundExcludePorts()}.String()+","+v, ",")
			}
			args = append(args, flag, v)
			sources = append(sources, "annotation "+k, "annotation "+k)
			continue
		}
		if strings.HasPrefix(k, trafficPrefix) {
			warnings = append(warnings, fmt.Sprintf("annotation %s is not supported by divert and was not applied", k))
		}
	}
	switch mode := pod.Annotations[AnnotationInterceptionMode]; mode {
	case "", "REDIRECT", "TPROXY":
		if mode != "" {
			args = append(args, "-m", mode)
			sources = append(sources, "annotation "+AnnotationInterceptionMode, "annotation "+AnnotationInterceptionMode)
		}
	default:
		warnings = append(warnings, fmt.Sprintf("annotation %s=%q is not supported by divert (use REDIRECT or TPROXY); using %s",
			AnnotationInterceptionMode, mode, defaults.Mode))
	}
	dns, dnsSource, err := dnsCapture(pod)
	if err != nil {
		return policy.Config{}, warnings, fmt.Errorf("pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	if dns {
		// As istio-cni: it reads no resolv.conf, so every destination's port 53 is captured.
		args = append(args, "--"+policy.FlagRedirectDNS+"=true", "--"+policy.FlagCaptureAllDNS+"=true")
		sources = append(sources, dnsSource, dnsSource)
	}
	envArgs, envSources, err := proxyEnvSettings(pod)
	if err != nil {
		return policy.Config{}, warnings, fmt.Errorf("pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	args, sources = append(args, envArgs...), append(sources, envSources...)
	uid, gid := proxyIDs(pod)
	if uid != "" {
		args = append(args, "-u", uid)
		sources = append(sources, "the proxy's uid", "the proxy's uid")
	}
	if gid != "" {
		args = append(args, "-g", gid)
		sources = append(sources, "the proxy's gid", "the proxy's gid")
	}

	cfg, err := policy.ParseArgs(defaults, args...)
	if err != nil {
		return policy.Config{}, warnings, fmt.Errorf("pod %s/%s %s: %w", pod.Namespace, pod.Name, culprit(args, sources, defaults), err)
	}
	if err := checkPolicy(&cfg); err != nil {
		return policy.Config{}, warnings, fmt.Errorf("pod %s/%s: %s asks for what eBPF cannot do (%w); node mode has no iptables fallback: "+
			"drop the setting, or capture this pod with divert as its init container (which falls back to istio's rules) or with Istio's own",
			pod.Namespace, pod.Name, culprit(args, sources, defaults, checkPolicy), err)
	}
	return cfg, warnings, nil
}

// checkPolicy is loader.CheckPolicy; tests replace it.
var checkPolicy = loader.CheckPolicy

// culprit names the setting whose value the parser (or, if given, check) refuses: the args
// of each source (sources has one per arg) are parsed alone.
func culprit(args, sources []string, defaults policy.Config, check ...func(*policy.Config) error) string {
	for i := 0; i < len(args); {
		n := 1
		for i+n < len(args) && sources[i+n] == sources[i] {
			n++
		}
		cfg, err := policy.ParseArgs(defaults, args[i:i+n]...)
		if err == nil && len(check) > 0 {
			err = check[0](&cfg)
		}
		if err != nil {
			return sources[i]
		}
		i += n
	}
	return "annotations"
}

// dnsCapture decides DNS capture as istio-cni does: ISTIO_META_DNS_CAPTURE in the
// istio-proxy container's environment (where the injector puts the mesh's proxyMetadata),
// overridden by the pod's proxy.istio.io/config proxyMetadata. It returns where the value
// came from; a value that is not a boolean is an error naming it (istio-cni logs it and
// leaves capture off).
func dnsCapture(pod *corev1.Pod) (bool, string, error) {
	value, source, err := proxyEnv(pod, DNSCaptureEnv)
	if err != nil || source == "" {
		return false, "", err
	}
	on, err := strconv.ParseBool(strings.TrimSpace(value))
	if err != nil {
		return false, "", fmt.Errorf("%s=%q: use true or false", source, value)
	}
	return on, source, nil
}

// proxyIDs finds the proxy's uid and gid: divert's annotations, else the istio-proxy
// container's securityContext (what Istio's injector sets), else the pod's securityContext
// (which the container inherits), else the defaults (""). The proxy is either a regular
// container or, with Istio's native sidecars (its default on Kubernetes 1.29+), an init
// container with restartPolicy: Always; both are read, or a proxy running as another uid
// than 1337 (OpenShift assigns one) would have its own connections captured.
func proxyIDs(pod *corev1.Pod) (uid, gid string) {
	uid, gid = pod.Annotations[AnnotationProxyUID], pod.Annotations[AnnotationProxyGID]
	var podUID, podGID *int64
	if sc := pod.Spec.SecurityContext; sc != nil {
		podUID, podGID = sc.RunAsUser, sc.RunAsGroup
	}
	for _, c := range proxyContainers(pod) {
		ctrUID, ctrGID := podUID, podGID
		if sc := c.SecurityContext; sc != nil {
			if sc.RunAsUser != nil {
				ctrUID = sc.RunAsUser
			}
			if sc.RunAsGroup != nil {
				ctrGID = sc.RunAsGroup
			}
		}
		if uid == "" && ctrUID != nil {
			uid = strconv.FormatInt(*ctrUID, 10)
		}
		if gid == "" && ctrGID != nil {
			gid = strconv.FormatInt(*ctrGID, 10)
		}
	}
	return uid, gid
}

// proxyContainers returns the istio-proxy container: a regular one, or a native sidecar
// (an init container that keeps running: restartPolicy Always).
func proxyContainers(pod *corev1.Pod) []corev1.Container {
	var out []corev1.Container
	for _, c := range pod.Spec.InitContainers {
		if c.Name == istioProxy && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			out = append(out, c)
		}
	}
	for _, c := range pod.Spec.Containers {
		if c.Name == istioProxy {
			out = append(out, c)
		}
	}
	return out
}
