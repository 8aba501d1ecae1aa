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
		// As the template: the pod's name from the downward API, which divert keeps beside
		// the pins for status and the node agent's metrics.
		initc["env"] = []obj{{"name": "DIVERT_CGROUP_ROOT", "value": "/host/sys/fs/cgroup"},
			{"name": "POD_NAME", "valueFrom": obj{"fieldRef": obj{"fieldPath": "metadata.name"}}},
			{"name": "POD_NAMESPACE", "valueFrom": obj{"fieldRef": obj{"fieldPath": "metadata.namespace"}}}}
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

// Services: each scenario pod that a Service row dials has a ClusterIP Service of its own
// name with a fixed address (known before any pod runs, so a pod's command line can name
// one), port 80 to the app's 8080: the Service port differs from the pod's, so every hop
// shows whether kube-proxy translated the connection.
const svcPort = "80"

var serviceIPs = map[string]string{
	plainName: "10.96.100.1",
	meshA:     "10.96.100.2",
	meshIpt:   "10.96.100.3",
	nodeMesh:  "10.96.100.4",
}

// vip is the pod's Service address.
func vip(pod string) string { return serviceIPs[pod] + ":" + svcPort }

func service(name, ip string) obj {
	return obj{"apiVersion": "v1", "kind": "Service",
		"metadata": obj{"name": name, "namespace": namespace},
		"spec": obj{"selector": obj{"app": name}, "clusterIP": ip,
			"ports": []obj{{"port": 80, "targetPort": 8080, "protocol": "TCP"}}}}
}

// containersOf returns the pod's containers and init containers.
func containersOf(p obj) []obj {
	spec := p["spec"].(obj)
	var cs []obj
	for _, k := range []string{"initContainers", "containers"} {
		if l, ok := spec[k].([]obj); ok {
			cs = append(cs, l...)
		}
	}
	return cs
}

func setEnv(c obj, name, value string) {
	env, _ := c["env"].([]obj)
	c["env"] = append(env, obj{"name": name, "value": value})
}

// withDNSCapture turns on Istio's DNS proxying the way its injector does when the mesh's
// proxyMetadata says ISTIO_META_DNS_CAPTURE=true: the variable goes into istio-init's
// environment (divert istio-iptables then captures port 53 of resolv.conf's nameservers)
// and the proxy container's (where istio-agent, here the test proxy, then serves DNS on
// 127.0.0.1:15053; node mode reads it there).
func withDNSCapture(p obj) obj {
	for _, c := range containersOf(p) {
		switch c["name"] {
		case "istio-init", "proxy", "istio-proxy":
			setEnv(c, "ISTIO_META_DNS_CAPTURE", "true")
		}
	}
	return p
}

// nativeSidecar is istio-proxy as Istio injects it on Kubernetes 1.29+: an init container
// with restartPolicy: Always, which the kubelet starts before the init containers after it
// and keeps running beside the app. The startupProbe (Istio probes its status port, 15021,
// which capture excludes) holds those init containers back until the proxy listens.
func nativeSidecar(name string, uid int) obj {
	c := container("istio-proxy", uid, "proxy", "--name", name+"-proxy", "--mode", "forward", "--inbound-src", "127.0.0.6",
		"--listen", "0.0.0.0:"+outboundPrt, "--listen", "0.0.0.0:"+inboundPrt, "--listen", "0.0.0.0:15021")
	c["restartPolicy"] = "Always"
	c["startupProbe"] = obj{"tcpSocket": obj{"port": 15021}, "periodSeconds": 1, "failureThreshold": 60}
	return c
}

// appInit is an app's init container after the sidecar: it dials target once; what it saw
// is its log.
func appInit(target string) obj {
	return container("app-init", appUID, "client", "--timeout", "3s", "--target", target)
}

// nativeInitPod is a native-sidecar pod with divert as istio-init: istio-init (Istio's
// template, then divert validate), the istio-proxy sidecar, an app init container, the app.
func nativeInitPod(name, bpffs string) obj {
	p := meshedPod(name, ebpf, istioTemplate, outboundPrt, bpffs)
	spec := p["spec"].(obj)
	app := spec["containers"].([]obj)[1]
	spec["initContainers"] = append(spec["initContainers"].([]obj), nativeSidecar(name, proxyUID), appInit(vip(plainName)))
	spec["containers"] = []obj{app}
	return p
}

// dupInitPod is a meshed pod with a second divert init container after istio-init, which
// attaches the same cgroup under another pod id: it must be refused (loader: one pod's
// programs per cgroup subtree), and so the pod must fail (restartPolicy: Never, or the
// kubelet would retry it for ever).
func dupInitPod(name, bpffs string) obj {
	p := meshedPod(name, ebpf, noValidate, outboundPrt, bpffs)
	spec := p["spec"].(obj)
	first := spec["initContainers"].([]obj)[0]
	second := obj{}
	for k, v := range first {
		second[k] = v
	}
	second["name"] = "istio-init-again"
	second["args"] = append(initArgs(ebpf, outboundPrt), "--pod-id", secondID(name))
	spec["initContainers"] = []obj{first, second}
	spec["restartPolicy"] = "Never"
	return p
}

// secondID is the pod id a pod's second divert attachment asks for.
func secondID(pod string) string { return pod + "-second" }
