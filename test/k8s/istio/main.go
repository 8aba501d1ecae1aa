// Command inject runs Istio's own sidecar injector over test pods, as a cluster with Istio
// installed the way docs/istio.md says would: the injector's configuration comes from
// Istio's own installation code (istioctl's manifest rendering of an IstioOperator plus
// deploy/istio/istio-operator.yaml, or the istiod Helm chart rendered with the docs' --set
// flags by tools/helm), and each pod goes through the webhook istiod serves
// (istio.io/istio/pkg/kube/inject: an AdmissionReview in, a JSON patch out, applied as the
// API server applies it). make e2e-k8s runs the injected pods.
//
//	inject -istioctl base.yaml,deploy/istio/istio-operator.yaml -in pods.yaml -out injected.yaml
//	inject -configmaps istiod-helm-template.yaml -in pods.yaml -out injected.yaml
//	inject -print-chart    # the istiod chart's directory in the pinned istio module
//
// Native sidecars (istio-proxy as an init container with restartPolicy: Always) are
// istiod's ENABLE_NATIVE_SIDECARS, read from the environment at start, as istiod reads it.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"

	jsonpatch "github.com/evanphx/json-patch/v5"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"

	"istio.io/istio/operator/pkg/render"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/config/mesh/meshwatcher"
	"istio.io/istio/pkg/kube/inject"
	"istio.io/istio/pkg/kube/multicluster"
	istiolog "istio.io/istio/pkg/log"
)

func main() {
	istioctl := flag.String("istioctl", "", "IstioOperator files, comma separated, rendered as istioctl install -f a -f b would")
	configMaps := flag.String("configmaps", "", "the istiod chart's output (helm template), holding the istio and istio-sidecar-injector ConfigMaps")
	in := flag.String("in", "", "pods to inject (YAML, one or more documents)")
	out := flag.String("out", "", "where to write the injected pods (a JSON v1 List)")
	dump := flag.String("dump-config", "", "also write the injector's config (the ConfigMap's config key) here, as JSON")
	printChart := flag.Bool("print-chart", false, "print the istiod chart's directory in the pinned istio module and exit")
	flag.Parse()
	if *printChart {
		dir, err := chartDir()
		exitOn(err)
		fmt.Println(dir)
		return
	}
	if (*istioctl == "") == (*configMaps == "") || *in == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "inject: pass -istioctl FILES or -configmaps FILE, and -in and -out")
		os.Exit(2)
	}
	// istiod logs every injection at info; errors stay.
	opts := istiolog.DefaultOptions()
	opts.SetDefaultOutputLevel("all", istiolog.ErrorLevel)
	exitOn(istiolog.Configure(opts))

	var cms map[string]map[string]string
	var err error
	if *istioctl != "" {
		cms, err = fromIstioctl(strings.Split(*istioctl, ","))
	} else {
		cms, err = fromFile(*configMaps)
	}
	exitOn(err)
	injector, mesh := cms["istio-sidecar-injector"], cms["istio"]
	if injector["config"] == "" || injector["values"] == "" || mesh["mesh"] == "" {
		exitOn(errors.New("no istio-sidecar-injector ConfigMap with config and values, or no istio ConfigMap with mesh, in Istio's output"))
	}
	if *dump != "" {
		js, err := yaml.YAMLToJSON([]byte(injector["config"]))
		exitOn(err)
		exitOn(os.WriteFile(*dump, js, 0o644))
	}
	wh, err := webhook(injector["config"], injector["values"], mesh["mesh"])
	exitOn(err)
	pods, err := os.ReadFile(*in)
	exitOn(err)
	var items []json.RawMessage
	for _, doc := range strings.Split(string(pods), "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		injected, err := injectPod(wh, []byte(doc))
		exitOn(err)
		items = append(items, injected)
	}
	b, err := json.MarshalIndent(map[string]any{"apiVersion": "v1", "kind": "List", "items": items}, "", "  ")
	exitOn(err)
	exitOn(os.WriteFile(*out, b, 0o644))
}

func exitOn(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "inject:", err)
		os.Exit(1)
	}
}

// chartDir is istio-discovery's directory in the istio module this binary was built from,
// for helm template (the same chart istioctl renders, embedded).
func chartDir() (string, error) {
	d, err := moduleDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(d, "manifests", "charts", "istio-control", "istio-discovery"), nil
}

// fromIstioctl renders the installation as `istioctl install -f a -f b` computes it (the
// operator's own code) and returns its ConfigMaps by name: data.
func fromIstioctl(files []string) (map[string]map[string]string, error) {
	sets, _, err := render.GenerateManifest(files, nil, false, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("istioctl's rendering of %v: %w", files, err)
	}
	cms := map[string]map[string]string{}
	for _, s := range sets {
		for _, m := range s.Manifests {
			if m.GetKind() != "ConfigMap" {
				continue
			}
			var cm corev1.ConfigMap
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m.Object, &cm); err != nil {
				return nil, err
			}
			cms[cm.Name] = cm.Data
		}
	}
	return cms, nil
}

// fromFile reads the ConfigMaps of a multi-document YAML file (helm template's output).
func fromFile(path string) (map[string]map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cms := map[string]map[string]string{}
	for _, doc := range strings.Split(string(b), "\n---") {
		var cm corev1.ConfigMap
		if err := yaml.Unmarshal([]byte(doc), &cm); err != nil || cm.Kind != "ConfigMap" {
			continue
		}
		cms[cm.Name] = cm.Data
	}
	return cms, nil
}

// webhook is istiod's injection webhook on config, values and mesh config as istiod reads
// them (its files, mounted from the two ConfigMaps).
func webhook(config, values, meshYAML string) (http.Handler, error) {
	dir, err := os.MkdirTemp("", "divert-istio-inject")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	configFile, valuesFile := filepath.Join(dir, "config"), filepath.Join(dir, "values")
	if err := os.WriteFile(configFile, []byte(config), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(valuesFile, []byte(values), 0o644); err != nil {
		return nil, err
	}
	m, err := mesh.ApplyMeshConfigDefaults(meshYAML)
	if err != nil {
		return nil, fmt.Errorf("mesh config: %w", err)
	}
	store := model.NewFakeStore()
	env := &model.Environment{Watcher: meshwatcher.NewTestWatcher(m), ConfigStore: store}
	env.SetPushContext(&model.PushContext{ProxyConfigs: model.GetProxyConfigs(store, m)})
	watcher, err := inject.NewFileWatcher(configFile, valuesFile)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	if _, err := inject.NewWebhook(inject.WebhookParameters{
		Watcher: watcher, Env: env, Mux: mux, MultiCluster: multicluster.NewFakeController(),
	}); err != nil {
		return nil, fmt.Errorf("istiod's webhook: %w", err)
	}
	return mux, nil
}

// injectPod sends one pod (YAML or JSON) through the webhook as the API server would (an
// admission.k8s.io/v1 AdmissionReview to /inject) and applies the JSON patch it answers.
func injectPod(wh http.Handler, doc []byte) ([]byte, error) {
	raw, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return nil, err
	}
	var pod corev1.Pod
	if err := json.Unmarshal(raw, &pod); err != nil {
		return nil, err
	}
	// The object as the API server hands it to webhooks: serialised from its type, so
	// fields like a container's resources are there ({}) for the patch to address.
	if raw, err = json.Marshal(&pod); err != nil {
		return nil, err
	}
	review := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       types.UID("divert-e2e-" + pod.Name),
			Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: pod.Namespace,
			Name:      pod.Name,
			Operation: admissionv1.Create,
		},
	}
	review.Request.Object.Raw = raw
	body, err := json.Marshal(review)
	if err != nil {
		return nil, err
	}
	req := httptest.NewRequest(http.MethodPost, "/inject", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	wh.ServeHTTP(rec, req)
	resp, _ := io.ReadAll(rec.Result().Body)
	if rec.Code != http.StatusOK {
		return nil, fmt.Errorf("pod %s: the webhook answered %d: %s", pod.Name, rec.Code, resp)
	}
	var answer admissionv1.AdmissionReview
	if err := json.Unmarshal(resp, &answer); err != nil {
		return nil, err
	}
	r := answer.Response
	if r == nil || !r.Allowed {
		return nil, fmt.Errorf("pod %s: refused by the webhook: %s", pod.Name, resp)
	}
	if len(r.Patch) == 0 {
		return nil, fmt.Errorf("pod %s: the webhook injected nothing", pod.Name)
	}
	patch, err := jsonpatch.DecodePatch(r.Patch)
	if err != nil {
		return nil, err
	}
	patched, err := patch.Apply(raw)
	if err != nil {
		return nil, fmt.Errorf("pod %s: applying the webhook's patch: %w", pod.Name, err)
	}
	return patched, nil
}
