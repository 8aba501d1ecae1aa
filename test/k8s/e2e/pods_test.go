package e2e

import "encoding/json"

const (
	namespace   = "divert-e2e"
	testappRef  = "divert.test/testapp:e2e"
	divertRef   = "divert.test/divert:e2e"
	proxyUID    = 1337
	appUID      = 1000
	appPort     = "8080"
	outboundPrt = "15001"
	inboundPrt  = "15006"
)

// istioFlags are the arguments Istio's injector gives istio-init for a default sidecar.
// proxyPort replaces -p: the broken-capture pod (and -k8s.break) pass a port nothing
// listens on.
func istioFlags(proxyPort string) []string {
	return []string{"-p", proxyPort, "-z", inboundPrt, "-u", "1337", "-m", "REDIRECT",
		"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}
}

// backend is how a meshed pod's init container captures traffic.
type backend string

const (
	ebpf     backend = "ebpf"     // --mode auto (Istio's command line as is), which must pick eBPF here
	iptables backend = "iptables" // --mode iptables: the fallback backend, forced
	// fallback is --mode auto on a node where eBPF is not possible, simulated with
	// divert's test hook DIVERT_TEST_FORCE_NO_EBPF=1: it must fall back to iptables.
	fallback backend = "fallback"
)

// shape is how the init container is wired into the pod.
type shape int

const (
	// istioTemplate is deploy/istio/divert-init-template.yaml applied to Istio's istio-init:
	// the image's entrypoint with args "istio-iptables ...", the host's cgroup tree read-only
	// at /host/sys/fs/cgroup (DIVERT_CGROUP_ROOT), bpffs with Bidirectional propagation; and
	// after it divert validate as istio-validation would run, as the proxy's uid with no
	// capabilities.
	istioTemplate shape = iota
	// hostCgroupAtSys mounts the host's /sys/fs/cgroup over the container's own and runs
	// "divert istio-iptables" as the command: the pod's cgroup is found through mountinfo.
	hostCgroupAtSys
	// noValidate is istioTemplate without the validation container (the broken pod: it
	// would stop the pod from starting, and the point is to see traffic fail).
	noValidate
)

func initArgs(b backend, proxyPort string) []string {
	args := []string{"istio-iptables"}
	if b == iptables {
		args = append(args, "--mode", "iptables")
	}
	return append(args, istioFlags(proxyPort)...)
}

type obj = map[string]any

func container(name string, uid int, args ...string) obj {
	return obj{
		"name": name, "image": testappRef, "imagePullPolicy": "Never",
		"command":         append([]string{"/testapp"}, args...),
		"securityContext": obj{"runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": false},
	}
}

func pod(name string, labels map[string]string, spec obj) obj {
	spec["terminationGracePeriodSeconds"] = 1
	spec["automountServiceAccountToken"] = false
	spec["enableServiceLinks"] = false
	return obj{"apiVersion": "v1", "kind": "Pod",
		"metadata": obj{"name": name, "namespace": namespace, "labels": labels},
		"spec":     spec}
}

// plainPod is an unmeshed server: the outside world for outbound rows and the client for
// inbound ones.
func plainPod(name string) obj {
	return pod(name, map[string]string{"app": name}, obj{
		"containers": []obj{container("app", appUID, "server", "--name", name, "--listen", "0.0.0.0:"+appPort)},
	})
}

// meshedPod is an Istio-shaped pod: divert as the init container (privileged, with the
// host's cgroup tree and the cluster's bpffs as /sys/fs/bpf), a transparent proxy as uid
// 1337 on 15001 (outbound) and 15006 (inbound, forwarding from 127.0.0.6 like Envoy), and an
// app on 8080 as uid 1000.
func meshedPod(name string, b backend, sh shape, proxyPort, bpffs string) obj {
	initc := obj{
		"name": "istio-init", "image": divertRef, "imagePullPolicy": "Never",
		"securityContext": obj{"privileged": true, "allowPrivilegeEscalation": true, "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false},
	}
	volumes := []obj{
		{"name": "divert-host-cgroup", "hostPath": obj{"path": "/sys/fs/cgroup", "type": "Directory"}},
		{"name": "divert-bpffs", "hostPath": obj{"path": bpffs, "type": "Directory"}},
	}
	bpfMount := obj{"name": "divert-bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}
	inits := []obj{initc}
	switch sh {
	case istioTemplate, noValidate:
		initc["args"] = initArgs(b, proxyPort)
		initc["env"] = []obj{{"name": "DIVERT_CGROUP_ROOT", "value": "/host/sys/fs/cgroup"}}
		if b == fallback {
			initc["env"] = append(initc["env"].([]obj), obj{"name": "DIVERT_TEST_FORCE_NO_EBPF", "value": "1"})
		}
		initc["volumeMounts"] = []obj{{"name": "divert-host-cgroup", "mountPath": "/host/sys/fs/cgroup", "readOnly": true}, bpfMount}
		if sh == istioTemplate {
			inits = append(inits, obj{
				"name": "divert-validate", "image": divertRef, "imagePullPolicy": "Never",
				"args": []string{"validate", "-p", proxyPort, "-z", inboundPrt, "-u", "1337"},
				"securityContext": obj{"runAsUser": proxyUID, "runAsGroup": proxyUID, "runAsNonRoot": true,
					"allowPrivilegeEscalation": false, "capabilities": obj{"drop": []string{"ALL"}}},
			})
		}
	case hostCgroupAtSys:
		initc["command"] = append([]string{"divert"}, initArgs(b, proxyPort)...)
		initc["volumeMounts"] = []obj{{"name": "divert-host-cgroup", "mountPath": "/sys/fs/cgroup"}, bpfMount}
	}
	return pod(name, map[string]string{"app": name, "divert.test/backend": string(b)}, obj{
		"initContainers": inits,
		"containers": []obj{
			container("proxy", proxyUID, "proxy", "--name", name+"-proxy", "--mode", "forward",
				"--inbound-src", "127.0.0.6", "--listen", "0.0.0.0:"+outboundPrt, "--listen", "0.0.0.0:"+inboundPrt),
			container("app", appUID, "server", "--name", name+"-app", "--listen", "0.0.0.0:"+appPort),
		},
		"volumes": volumes,
	})
}

func list(items ...obj) string {
	b, _ := json.Marshal(obj{"apiVersion": "v1", "kind": "List", "items": items})
	return string(b)
}
