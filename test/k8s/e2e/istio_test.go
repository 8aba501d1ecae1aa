package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// Istio's own injector (test/k8s/istio: istiod's webhook code from a pinned istio.io/istio)
// with Istio's real "sidecar" template and divert's, installed as docs/istio.md says: with
// istioctl (your IstioOperator, then deploy/istio/istio-operator.yaml) and with the istiod
// Helm chart (--set-file sidecarInjectorWebhook.templates.divert=..., defaultTemplates
// {sidecar,divert}). The classic shape (istio-proxy a regular container) comes from the
// istioctl installation, the native one (istio-proxy an init container with restartPolicy:
// Always) from the Helm one. What the injector made is asserted, then run: only istio-proxy
// is swapped for a stand-in (no Envoy here) that keeps Istio's uid, env and ports.
const (
	istioClassic = "istio-classic"
	istioNative  = "istio-native"
	// istioCustom brings its own istio-proxy running as uid 2000 (Istio then passes -u 2000
	// to istio-init) and excludes mesh-ipt's address with Istio's annotation (-x).
	istioCustom = "istio-custom"
	customUID   = 2000
	divertTmpl  = "../../../deploy/istio/divert-init-template.yaml"
	divertIOP   = "../../../deploy/istio/istio-operator.yaml"
)

// templateImage is the image divert's template names (the Makefile's IMAGE, which make
// manifests writes there): the test image is tagged so.
var templateImage = func() string {
	b, err := os.ReadFile(divertTmpl)
	if err != nil {
		panic(err)
	}
	m := regexp.MustCompile(`(?m)^\s*image:\s*(\S+)`).FindSubmatch(b)
	if m == nil {
		panic(divertTmpl + " names no image")
	}
	return string(m[1])
}()

// istioArgs is istio-init's command line as Istio's sidecar template renders it for these
// pods (docs/istio.md quotes it); divert's template must leave it alone.
var istioArgs = []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
	"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"}

func TestIstioInjector(t *testing.T) {
	var pods map[string]obj
	if !t.Run("inject", func(t *testing.T) { pods = istioInject(t) }) {
		t.Fatal("injection failed; nothing to run")
	}
	for _, tc := range []struct {
		name, via string
		native    bool
	}{{istioClassic, "istioctl", false}, {istioNative, "helm", true}, {istioCustom, "istioctl", false}} {
		p := pods[tc.name]
		t.Run(tc.name+"/spec", func(t *testing.T) { istioSpec(t, p, tc.via, tc.native) })
	}
	// Gone before node mode's rows: its agent would take these pods for its own.
	t.Cleanup(func() {
		suite.c.Kubectl(ctx, append([]string{"delete", "pod", "-n", namespace, "--wait=false", "--ignore-not-found"}, istioPods...)...)
	})
	if !t.Run("pods-start", func(t *testing.T) { istioPodsUp(t, pods) }) {
		t.Fatal("the injected pods did not start")
	}
	for _, name := range istioPods {
		t.Run(name+"/init", func(t *testing.T) { initLog(t, name, ebpf) })
		t.Run(name+"/outbound", func(t *testing.T) { outbound(t, name) })
		t.Run(name+"/inbound", func(t *testing.T) { inbound(t, name, addr(name, appPort)) })
	}
	// Istio's annotation, rendered by its template into istio-init's -x: the dial to mesh-ipt
	// skips this pod's proxy and enters mesh-ipt through its own.
	t.Run(istioCustom+"/excluded-cidr", func(t *testing.T) {
		r := scenario(t)
		expect(t, r, istioCustom, "app", addr(meshIpt, appPort),
			want{who: meshIpt + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(meshIpt, appPort), local: addr(meshIpt, inboundPrt)},
			want{who: meshIpt + "-app", peerIP: "127.0.0.6"})
	})
}

var istioPods = []string{istioClassic, istioNative, istioCustom}

// istioInject renders both installations and injects one pod with each.
func istioInject(t *testing.T) map[string]obj {
	r := scenario(t)
	bin, err := repoTool("test/k8s/istio", "istio-inject")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, v any) string {
		b, _ := json.Marshal(v)
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The user's own installation, given to istioctl before divert's overlay.
	base := write("your-install.yaml", obj{"apiVersion": "install.istio.io/v1alpha1", "kind": "IstioOperator",
		"spec": obj{"profile": "default", "meshConfig": obj{"accessLogFile": "/dev/stdout"}}})
	inject := func(name string, native bool, source ...string) obj {
		in := write(name+"-in.yaml", istioAppPod(name, name == istioCustom))
		out := filepath.Join(dir, name+"-out.json")
		cmd := exec.CommandContext(ctx, bin, append(source, "-in", in, "-out", out, "-dump-config", filepath.Join(dir, name+"-config.json"))...)
		cmd.Env = append(os.Environ(), fmt.Sprintf("ENABLE_NATIVE_SIDECARS=%t", native))
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("injecting %s: %v\n%s", name, err, b)
		}
		var l struct{ Items []obj }
		b, err := os.ReadFile(out)
		if err == nil {
			err = json.Unmarshal(b, &l)
		}
		if err != nil || len(l.Items) != 1 {
			t.Fatalf("injector output %s: %v", out, err)
		}
		return l.Items[0]
	}
	classic := inject(istioClassic, false, "-istioctl", base+","+divertIOP)
	custom := inject(istioCustom, false, "-istioctl", base+","+divertIOP)

	// The istiod chart from the same istio module, rendered by Helm as the docs' helm upgrade
	// sets it.
	chartOut, err := exec.CommandContext(ctx, bin, "-print-chart").Output()
	if err != nil {
		t.Fatal(err)
	}
	rendered, err := helm("template", "istiod", strings.TrimSpace(string(chartOut)), "--namespace", "istio-system",
		"--set-file", "sidecarInjectorWebhook.templates.divert="+divertTmpl,
		"--set", "sidecarInjectorWebhook.defaultTemplates={sidecar,divert}")
	if err != nil {
		t.Fatal(err)
	}
	cms := filepath.Join(dir, "istiod-helm-template.yaml")
	if err := os.WriteFile(cms, []byte(rendered), 0o644); err != nil {
		t.Fatal(err)
	}
	native := inject(istioNative, true, "-configmaps", cms)

	// Both installations carry divert's template verbatim and select it after sidecar.
	tmpl, err := os.ReadFile(divertTmpl)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{istioClassic, istioNative} {
		b, err := os.ReadFile(filepath.Join(dir, name+"-config.json"))
		if err != nil {
			t.Fatal(err)
		}
		var cfg struct {
			DefaultTemplates []string          `json:"defaultTemplates"`
			Templates        map[string]string `json:"templates"`
		}
		if err := json.Unmarshal(b, &cfg); err != nil {
			t.Fatalf("%s's injector config: %v", name, err)
		}
		if !slices.Equal(cfg.DefaultTemplates, []string{"sidecar", "divert"}) || cfg.Templates["sidecar"] == "" ||
			strings.TrimSpace(cfg.Templates["divert"]) != strings.TrimSpace(string(tmpl)) {
			t.Fatalf("%s: the injector's config has defaultTemplates %v and templates.divert %s divert-init-template.yaml",
				name, cfg.DefaultTemplates, map[bool]string{true: "equal to", false: "not equal to"}[strings.TrimSpace(cfg.Templates["divert"]) == strings.TrimSpace(string(tmpl))])
		}
	}
	r.note("istioctl (your IstioOperator + istio-operator.yaml) -> %s; helm template istiod --set-file templates.divert -> %s; defaultTemplates [sidecar divert] in both",
		istioClassic, istioNative)
	return map[string]obj{istioClassic: classic, istioNative: native, istioCustom: custom}
}

// istioAppPod is what a user would write: an app, no sidecar, no divert; custom adds an
// istio-proxy of the user's (only its uid: Istio fills in the rest) and an annotation.
func istioAppPod(name string, custom bool) obj {
	app := container("app", appUID, "server", "--name", name+"-app", "--listen", "0.0.0.0:"+appPort)
	app["ports"] = []obj{{"containerPort": 8080, "name": "http"}}
	ctrs := []obj{app}
	if custom {
		ctrs = append(ctrs, obj{"name": "istio-proxy", "image": "auto",
			"securityContext": obj{"runAsUser": customUID, "runAsGroup": customUID}})
	}
	p := pod(name, map[string]string{"app": name}, obj{"containers": ctrs})
	delete(p["spec"].(obj), "automountServiceAccountToken")
	if custom {
		p["metadata"].(obj)["annotations"] = obj{"traffic.sidecar.istio.io/excludeOutboundIPRanges": suite.ips[meshIpt] + "/32"}
	}
	return p
}
