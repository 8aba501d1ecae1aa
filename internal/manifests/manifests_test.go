package manifests

import (
	"strings"
	"testing"
)

func TestIsDivert(t *testing.T) {
	for ref, want := range map[string]bool{
		"divert:0.1.0":                                 true,
		"ghcr.io/meshdivert/divert:0.1.0":              true,
		"localhost:5000/divert":                        true,
		"registry.example.com/divert@sha256:0123":      true,
		"haproxy:2.8":                                  false,
		"registry.k8s.io/e2e-test-images/agnhost:2.52": false,
		"ghcr.io/meshdivert/divert-extra:1":            false,
		"localhost:5000/notdivert:1":                   false,
	} {
		if IsDivert(ref) != want {
			t.Errorf("IsDivert(%q) = %v", ref, !want)
		}
	}
}

func TestSetImage(t *testing.T) {
	in := `containers:
- name: a
  image: divert:latest # the image
- image: "ghcr.io/meshdivert/divert:0.0.9"
  name: b
- name: proxy
  image: haproxy:2.8
`
	want := `containers:
- name: a
  image: my.registry/divert:0.1.0 # the image
- image: "my.registry/divert:0.1.0"
  name: b
- name: proxy
  image: haproxy:2.8
`
	if got := string(SetImage([]byte(in), "my.registry/divert:0.1.0")); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	if got := strings.Join(Images([]byte(want)), ","); got != "my.registry/divert:0.1.0,my.registry/divert:0.1.0,haproxy:2.8" {
		t.Errorf("Images: %s", got)
	}
}

// The generated operator carries the template verbatim in a literal block, indented under
// templates.divert; blank lines stay blank.
func TestOperator(t *testing.T) {
	got := string(Operator([]byte("# c\nspec:\n\n  x: 1\n")))
	if !strings.HasSuffix(got, "        divert: |\n          # c\n          spec:\n\n            x: 1\n") || !strings.Contains(got, "make manifests") {
		t.Errorf("got\n%s", got)
	}
}

func TestChartImage(t *testing.T) {
	chart := []byte("apiVersion: v2\nname: divert\nversion: 0.1.0\nappVersion: \"0.1.0\"\n")
	values := []byte("image:\n  repository: ghcr.io/meshdivert/divert\n  tag: \"\"\n")
	if got := ChartImage(chart, values); got != "ghcr.io/meshdivert/divert:0.1.0" {
		t.Errorf("ChartImage: %s", got)
	}
	repo, tag, ok := SplitImage("localhost:5000/x/divert:0.2.0")
	if !ok || repo != "localhost:5000/x/divert" || tag != "0.2.0" {
		t.Errorf("SplitImage: %s %s %v", repo, tag, ok)
	}
	for _, ref := range []string{"localhost:5000/divert", "divert@sha256:0123", "divert"} {
		if _, _, ok := SplitImage(ref); ok {
			t.Errorf("SplitImage(%q) has no tag to split", ref)
		}
	}
	c, v := SetChartVersion(chart, "0.2.0"), SetChartRepository(values, "localhost:5000/x/divert")
	if got := ChartImage(c, v); got != "localhost:5000/x/divert:0.2.0" || !strings.Contains(string(c), "\nversion: 0.2.0\n") || !strings.Contains(string(v), "tag: \"\"") {
		t.Errorf("after setting: %s\n%s\n%s", got, c, v)
	}
}
