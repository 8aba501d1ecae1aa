package e2e

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// istioSpec checks what Istio's injector made of divert's template merged onto its own
// sidecar template: istio-init runs divert's image with Istio's own arguments, divert's
// security context and mounts; istio-proxy is Istio's (uid 1337, its env and ports), a
// container or, natively, an init container after istio-init.
func istioSpec(t *testing.T, p obj, via string, native bool) {
	r := scenario(t)
	spec := p["spec"].(obj)
	inits, ctrs := named(spec["initContainers"]), named(spec["containers"])
	initc, ok := inits["istio-init"]
	if !ok {
		t.Fatalf("no istio-init container: %v", keys(inits))
	}
	if initc["image"] != templateImage {
		t.Errorf("istio-init image %v, want divert's %s", initc["image"], templateImage)
	}
	wantArgs, uid := istioArgs, 1337.0
	if p["metadata"].(obj)["name"] == istioCustom {
		// Istio's own rendering of the pod's settings: the user's proxy uid, the annotation.
		wantArgs, uid = slices.Clone(istioArgs), customUID
		wantArgs[slices.Index(wantArgs, "-u")+1] = fmt.Sprint(customUID)
		wantArgs[slices.Index(wantArgs, "-x")+1] = suite.ips[meshIpt] + "/32"
	}
	if c, a := strs(initc["command"]), strs(initc["args"]); len(c) != 0 || !slices.Equal(a, wantArgs) {
		t.Errorf("istio-init command %q args %q, want Istio's own args %q (divert's entrypoint runs them)", c, a, wantArgs)
	}
	sc, _ := initc["securityContext"].(obj)
	for k, v := range map[string]any{"privileged": true, "allowPrivilegeEscalation": true, "runAsUser": 0.0, "runAsGroup": 0.0, "runAsNonRoot": false} {
		if sc[k] != v {
			t.Errorf("istio-init securityContext.%s = %v, want %v (divert's template): %v", k, sc[k], v, sc)
		}
	}
	if env := envOf(initc); env["DIVERT_CGROUP_ROOT"] != "/host/sys/fs/cgroup" {
		t.Errorf("istio-init env %v lacks DIVERT_CGROUP_ROOT", env)
	}
	mounts := map[string]obj{}
	for _, m := range list2(initc["volumeMounts"]) {
		mounts[m["name"].(string)] = m
	}
	if m := mounts["divert-host-cgroup"]; m == nil || m["mountPath"] != "/host/sys/fs/cgroup" || m["readOnly"] != true {
		t.Errorf("istio-init mounts %v: want the host's cgroup tree read-only at /host/sys/fs/cgroup", mounts)
	}
	if m := mounts["divert-bpffs"]; m == nil || m["mountPath"] != "/sys/fs/bpf" || m["mountPropagation"] != "Bidirectional" {
		t.Errorf("istio-init mounts %v: want the host's bpffs at /sys/fs/bpf, Bidirectional", mounts)
	}
	vols := map[string]obj{}
	for _, v := range list2(spec["volumes"]) {
		vols[v["name"].(string)] = v
	}
	for name, path := range map[string]string{"divert-host-cgroup": "/sys/fs/cgroup", "divert-bpffs": "/sys/fs/bpf"} {
		if hp, _ := vols[name]["hostPath"].(obj); hp == nil || hp["path"] != path {
			t.Errorf("volume %s: %v, want hostPath %s", name, vols[name], path)
		}
	}
	for _, v := range []string{"istio-envoy", "istio-data", "istio-podinfo", "istio-token", "istiod-ca-cert"} {
		if vols[v] == nil {
			t.Errorf("Istio's volume %s is gone: %v", v, keys(vols))
		}
	}
	// istio-proxy: where the shape puts it, as Istio's uid, with its ports and env.
	proxy, where := ctrs["istio-proxy"], "containers"
	if native {
		proxy, where = inits["istio-proxy"], "initContainers"
		order := strs(mapNames(spec["initContainers"]))
		if proxy == nil || proxy["restartPolicy"] != "Always" || !slices.Equal(order, []string{"istio-init", "istio-proxy"}) {
			t.Fatalf("native sidecar: init containers %v, istio-proxy restartPolicy %v", order, proxy["restartPolicy"])
		}
		if ctrs["istio-proxy"] != nil {
			t.Fatalf("native sidecar: istio-proxy is also a regular container")
		}
	} else if proxy == nil || inits["istio-proxy"] != nil {
		t.Fatalf("classic sidecar: istio-proxy must be a regular container: %v / %v", keys(ctrs), keys(inits))
	}
	psc, _ := proxy["securityContext"].(obj)
	if psc["runAsUser"] != uid || psc["runAsGroup"] != uid || psc["runAsNonRoot"] != true {
		t.Errorf("istio-proxy securityContext %v, want uid/gid %v", psc, uid)
	}
	var ports []string
	for _, pt := range list2(proxy["ports"]) {
		ports = append(ports, fmt.Sprint(pt["containerPort"]))
	}
	if !slices.Contains(ports, "15090") {
		t.Errorf("istio-proxy ports %v lack Envoy's 15090", ports)
	}
	var status struct{ InitContainers, Containers, Volumes []string }
	ann, _ := p["metadata"].(obj)["annotations"].(obj)
	if err := json.Unmarshal([]byte(fmt.Sprint(ann["sidecar.istio.io/status"])), &status); err != nil || !slices.Contains(status.InitContainers, "istio-init") {
		t.Errorf("sidecar.istio.io/status %v (%v)", ann["sidecar.istio.io/status"], err)
	}
	r.note("via %s: istio-init = %s %q, privileged, root, cgroup+bpffs mounted; istio-proxy in %s as %v, env %d, ports %v; status volumes %v",
		via, initc["image"], strings.Join(strs(initc["args"]), " "), where, uid, len(envOf(proxy)), ports, status.Volumes)
}

// istioPodsUp runs the injected pods with the one stand-in the cluster needs: istio-proxy
// runs the test proxy (listening on 15001 and 15006 like Envoy) instead of Envoy, with
// Istio's probes dropped (nothing serves Envoy's 15021); its uid, env, ports and mounts stay
// Istio's. divert's bpffs volume points at the cluster's private bpffs, as every pod of this
// suite does; istio-ca-root-cert (istiod writes it in every namespace) is a placeholder.
func istioPodsUp(t *testing.T, pods map[string]obj) {
	r := scenario(t)
	cm := obj{"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj{"name": "istio-ca-root-cert", "namespace": namespace},
		"data": obj{"root-cert.pem": "placeholder: no istiod here"}}
	var items []obj
	for _, name := range istioPods {
		p := pods[name]
		spec := p["spec"].(obj)
		for _, field := range []string{"initContainers", "containers"} {
			for _, c := range list2(spec[field]) {
				if c["name"] != "istio-proxy" {
					continue
				}
				c["image"], c["imagePullPolicy"] = testappRef, "Never"
				c["command"] = []string{"/testapp", "proxy", "--name", name + "-proxy", "--mode", "forward",
					"--inbound-src", "127.0.0.6", "--listen", "0.0.0.0:" + outboundPrt, "--listen", "0.0.0.0:" + inboundPrt}
				delete(c, "args")
				for _, probe := range []string{"readinessProbe", "startupProbe", "livenessProbe", "lifecycle"} {
					delete(c, probe)
				}
			}
		}
		for _, v := range list2(spec["volumes"]) {
			if v["name"] == "divert-bpffs" {
				v["hostPath"].(obj)["path"] = suite.c.BPFFS
			}
		}
		items = append(items, p)
	}
	if err := tagImage(divertRef, templateImage); err != nil {
		t.Fatal(err)
	}
	if _, err := suite.c.KubectlIn(ctx, list(append([]obj{cm}, items...)...), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := suite.c.Kubectl(ctx, append([]string{"wait", "-n", namespace, "--for=condition=Ready", "--timeout=120s", "pod"}, istioPods...)...); err != nil {
		t.Fatalf("%v\n%s", err, suite.describe())
	}
	out, err := suite.c.Kubectl(ctx, append(append([]string{"get", "pods", "-n", namespace}, istioPods...), "-o",
		`jsonpath={range .items[*]}{.metadata.name}={.status.podIP}={.metadata.uid}{"\n"}{end}`)...)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Fields(out) {
		f := strings.Split(l, "=")
		suite.ips[f[0]], suite.uids[f[0]] = f[1], f[2]
	}
	for _, name := range istioPods {
		for _, ctr := range []string{"istio-proxy", "app"} {
			if err := waitListening(name, ctr); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.note("Ready in %s: %s %s, %s %s, %s %s", time.Since(start).Round(100*time.Millisecond),
		istioClassic, suite.ips[istioClassic], istioNative, suite.ips[istioNative], istioCustom, suite.ips[istioCustom])
}

func list2(v any) []obj {
	var out []obj
	for _, x := range asSlice(v) {
		if o, ok := x.(obj); ok {
			out = append(out, o)
		}
	}
	return out
}

func asSlice(v any) []any {
	switch s := v.(type) {
	case []any:
		return s
	case []obj:
		out := make([]any, len(s))
		for i := range s {
			out[i] = s[i]
		}
		return out
	}
	return nil
}

func named(v any) map[string]obj {
	m := map[string]obj{}
	for _, c := range list2(v) {
		m[fmt.Sprint(c["name"])] = c
	}
	return m
}

func mapNames(v any) []any {
	var out []any
	for _, c := range list2(v) {
		out = append(out, c["name"])
	}
	return out
}

func strs(v any) []string {
	var out []string
	for _, x := range asSlice(v) {
		out = append(out, fmt.Sprint(x))
	}
	return out
}

func keys(m map[string]obj) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func envOf(c obj) map[string]string {
	env := map[string]string{}
	for _, e := range list2(c["env"]) {
		env[fmt.Sprint(e["name"])] = fmt.Sprint(e["value"])
	}
	return env
}
