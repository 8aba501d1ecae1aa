// Package manifests keeps deploy/ in one piece: the IstioOperator is generated from the
// injection template (one source for the template's text), and divert's image is set in
// every manifest at once. `make manifests` runs it (./internal/manifests/gen); deploy's test
// checks the committed files are what it makes.
package manifests

import (
	"bytes"
	"regexp"
	"strings"
)

// Paths below deploy/.
const (
	TemplatePath = "istio/divert-init-template.yaml"
	OperatorPath = "istio/istio-operator.yaml"
)

const operatorHead = `# GENERATED from divert-init-template.yaml beside this file by "make manifests"; do not
# edit: edit the template and run "make manifests" (deploy's test fails while they differ).
#
# istioctl install -f <your IstioOperator> -f deploy/istio/istio-operator.yaml: every injected
# pod gets divert instead of istio-iptables in its istio-init container. Pass your own
# IstioOperator (or --set profile=... and the settings you installed with) first: istioctl
# builds the installation from the files it is given, so this file alone would reinstall
# Istio with the default profile (docs/istio.md). To opt pods in one by one instead, drop
# defaultTemplates and annotate those pods with inject.istio.io/templates: sidecar,divert
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata:
  name: divert
  namespace: istio-system
spec:
  values:
    sidecarInjectorWebhook:
      defaultTemplates:
      - sidecar
      - divert
      templates:
        divert: |
`

// Operator returns the IstioOperator that installs template (the injection template's
// text, verbatim) as the sidecar injector's "divert" template, applied after "sidecar".
func Operator(template []byte) []byte {
	var b bytes.Buffer
	b.WriteString(operatorHead)
	for _, l := range strings.SplitAfter(string(template), "\n") {
		if strings.TrimSpace(l) != "" {
			b.WriteString("          ")
		}
		b.WriteString(l)
	}
	return b.Bytes()
}

// imageLine is a YAML "image:" field, in a list item or not, with an optional comment.
var imageLine = regexp.MustCompile(`(?m)^(\s*(?:-\s+)?image:\s*)("?)([^\s"#]+)("?)`)

// IsDivert reports whether an image reference is divert's: its repository's last path
// element is "divert" (divert:0.1.0, ghcr.io/meshdivert/divert:0.1.0, a digest too).
func IsDivert(ref string) bool {
	repo := ref
	if i := strings.Index(repo, "@"); i >= 0 {
		repo = repo[:i]
	}
	if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
		repo = repo[:i]
	}
	return repo == "divert" || strings.HasSuffix(repo, "/divert")
}

// SetImage replaces divert's image reference (IsDivert) in every image field of a YAML
// text with image, leaving other images and everything else as they are.
func SetImage(text []byte, image string) []byte {
	return imageLine.ReplaceAllFunc(text, func(m []byte) []byte {
		g := imageLine.FindSubmatch(m)
		if !IsDivert(string(g[3])) {
			return m
		}
		return []byte(string(g[1]) + string(g[2]) + image + string(g[4]))
	})
}

// Images returns the image references of every image field of a YAML text, in order.
func Images(text []byte) []string {
	var out []string
	for _, g := range imageLine.FindAllSubmatch(text, -1) {
		out = append(out, string(g[3]))
	}
	return out
}

// The Helm chart (deploy/helm/divert) names the image in two places: values.yaml's
// image.repository and Chart.yaml's appVersion (image.tag's default), which the chart's
// version follows.
const (
	ChartPath  = "helm/divert/Chart.yaml"
	ValuesPath = "helm/divert/values.yaml"
)

var (
	repositoryLine = regexp.MustCompile(`(?m)^(  repository:\s*)(\S+)`)
	versionLine    = regexp.MustCompile(`(?m)^((?:app)?[vV]ersion:\s*)("?)([^\s"#]+)("?)`)
)

// SplitImage splits a reference into repository and tag; ok is false without a tag (or with
// a digest), which a chart's appVersion cannot carry.
func SplitImage(ref string) (repo, tag string, ok bool) {
	if strings.Contains(ref, "@") {
		return "", "", false
	}
	i := strings.LastIndex(ref, ":")
	if i < 0 || i < strings.LastIndex(ref, "/") {
		return "", "", false
	}
	return ref[:i], ref[i+1:], true
}

// SetChartRepository sets image.repository in the chart's values.yaml.
func SetChartRepository(values []byte, repo string) []byte {
	return repositoryLine.ReplaceAll(values, []byte("${1}"+repo))
}

// SetChartVersion sets the chart's version and appVersion in Chart.yaml.
func SetChartVersion(chart []byte, tag string) []byte {
	return versionLine.ReplaceAll(chart, []byte("${1}${2}"+tag+"${4}"))
}

// ChartImage is the image the chart installs by default: values.yaml's image.repository
// and Chart.yaml's appVersion.
func ChartImage(chart, values []byte) string {
	var repo, tag string
	if m := repositoryLine.FindSubmatch(values); m != nil {
		repo = string(m[2])
	}
	for _, m := range versionLine.FindAllSubmatch(chart, -1) {
		if strings.HasPrefix(string(m[1]), "appVersion") {
			tag = string(m[3])
		}
	}
	return repo + ":" + tag
}
