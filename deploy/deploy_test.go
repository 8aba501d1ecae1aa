// Package deploy holds divert's Kubernetes manifests; this test reads every one of them
// strictly as Kubernetes objects (unknown or duplicate fields fail) and checks what makes
// them work: the image, privileges, the host cgroupfs and bpffs mounts, the command lines.
package deploy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	kyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/meshdivert/divert/internal/image"
	gen "github.com/meshdivert/divert/internal/manifests"
)

// injectorArgs is Istio's istio-init command line, which the example pod uses verbatim.
var injectorArgs = []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// istioOperator is the part of Istio's IstioOperator that divert's overlay sets; decoding
// into it strictly catches a misspelt field.
type istioOperator struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec struct {
		Values struct {
			SidecarInjectorWebhook struct {
				DefaultTemplates []string          `json:"defaultTemplates"`
				Templates        map[string]string `json:"templates"`
			} `json:"sidecarInjectorWebhook"`
		} `json:"values"`
	} `json:"spec"`
}

// chartDir is the Helm chart: templates, not manifests (tools/helm renders and checks it).
const chartDir = "helm"

// decoder decodes YAML into the built-in Kubernetes types, strictly: an unknown or
// duplicate field is an error, as kubectl's server-side field validation would make it.
var decoder = kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
	kjson.SerializerOptions{Yaml: true, Strict: true})

// podGVK is what an Istio injection template is: a fragment of a Pod, with no kind.
var podGVK = schema.GroupVersionKind{Version: "v1", Kind: "Pod"}

// manifests decodes every YAML document under deploy/: Kubernetes objects through the
// strict serializer, the IstioOperator through istioOperator, and injection templates
// (*-template.yaml) as Pods.
func manifests(t *testing.T) (objs map[string][]runtime.Object, operators map[string]istioOperator) {
	t.Helper()
	objs, operators = map[string][]runtime.Object{}, map[string]istioOperator{}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && path == chartDir {
			return filepath.SkipDir // Go templates; tools/helm decodes what they render
		}
		if err != nil || d.IsDir() || !(strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		r := kyaml.NewYAMLReader(bufio.NewReader(f))
		for {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			var head struct{ APIVersion, Kind string }
			if err := kyaml.Unmarshal(doc, &head); err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			switch {
			case head.Kind == "IstioOperator":
				js, err := kyaml.ToJSON(doc)
				if err != nil {
					t.Fatalf("%s: %v", path, err)
				}
				dec := json.NewDecoder(bytes.NewReader(js))
				dec.DisallowUnknownFields()
				var op istioOperator
				if err := dec.Decode(&op); err != nil {
					t.Fatalf("%s: not an IstioOperator divert's overlay would set: %v", path, err)
				}
				operators[path] = op
			case strings.HasSuffix(path, "-template.yaml"):
				if head.Kind != "" {
					t.Fatalf("%s: an injection template is a Pod fragment without kind, has kind %q", path, head.Kind)
				}
				gvk := podGVK
				obj, _, err := decoder.Decode(doc, &gvk, nil)
				if err != nil {
					t.Fatalf("%s: not a strict Pod fragment: %v", path, err)
				}
				objs[path] = append(objs[path], obj)
			default:
				obj, _, err := decoder.Decode(doc, nil, nil)
				if err != nil {
					t.Fatalf("%s: not a strict Kubernetes object: %v", path, err)
				}
				objs[path] = append(objs[path], obj)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return objs, operators
}

func stripComments(doc []byte) []byte {
	var out []byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(l); len(t) > 0 && t[0] != '#' {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

// imageRef is the image the Dockerfile makes, as the Makefile's IMAGE names it (make image,
// make manifests) and every manifest and doc must.
var imageRef = makefileImage()

// makefileImage expands the Makefile's default IMAGE (IMAGE ?= ...$(VERSION)).
func makefileImage() string {
	b, err := os.ReadFile(filepath.Join(image.RepoRoot(), "Makefile"))
	if err != nil {
		panic(err)
	}
	vars := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "?="); ok && (strings.TrimSpace(k) == "VERSION" || strings.TrimSpace(k) == "IMAGE") {
			vars[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return strings.ReplaceAll(vars["IMAGE"], "$(VERSION)", vars["VERSION"])
}

// The image is versioned, and one reference is used everywhere: the Makefile, every image
// field of every manifest (the injection template inside the IstioOperator included), and
// the docs' examples. A floating tag with IfNotPresent would leave each node on whichever
// build it pulled first.
func TestImageNamesAgree(t *testing.T) {
	repo, tag, ok := strings.Cut(imageRef, ":")
	if !ok || tag == "" || tag == "latest" || strings.Contains(tag, "$") || !gen.IsDivert(repo) {
		t.Fatalf("Makefile: IMAGE %q, want a versioned divert image (<registry>/divert:<VERSION>)", imageRef)
	}
	files := []string{"../README.md", "../docs/istio.md", "../docs/install.md"}
	err := filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && p == chartDir {
			return filepath.SkipDir
		}
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".yaml") {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// The chart's default: values.yaml's image.repository at Chart.yaml's appVersion.
	chart := readFile(t, gen.ChartPath)
	values := readFile(t, gen.ValuesPath)
	if got := gen.ChartImage(chart, values); got != imageRef {
		t.Errorf("deploy/helm/divert installs %s by default, want the Makefile's %s (make manifests sets it)", got, imageRef)
	}
	for _, f := range files {
		b := readFile(t, f)
		n := 0
		for _, ref := range gen.Images(b) {
			if gen.IsDivert(ref) {
				n++
				if ref != imageRef {
					t.Errorf("%s: image %s, want the Makefile's %s (make manifests sets it everywhere)", f, ref, imageRef)
				}
			}
		}
		if n == 0 && !strings.HasSuffix(f, ".md") {
			t.Errorf("%s: no divert image", f)
		}
		if bytes.Contains(b, []byte("divert:latest")) {
			t.Errorf("%s: names divert:latest", f)
		}
	}
	// The pod specs, as decoded (the template inside the IstioOperator too).
	objs, ops := manifests(t)
	for p, op := range ops {
		gvk := podGVK
		obj, _, err := decoder.Decode([]byte(op.Spec.Values.SidecarInjectorWebhook.Templates["divert"]), &gvk, nil)
		if err != nil {
			t.Fatalf("%s: templates.divert is not a strict Pod fragment: %v", p, err)
		}
		objs[p+" templates.divert"] = []runtime.Object{obj}
	}
	n := 0
	for path, list := range objs {
		for _, obj := range list {
			spec := podSpec(obj)
			if spec == nil {
				continue
			}
			for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
				if gen.IsDivert(c.Image) {
					n++
					if c.Image != imageRef {
						t.Errorf("%s: container %s uses %s, want %s", path, c.Name, c.Image, imageRef)
					}
				}
			}
		}
	}
	if n < 6 {
		t.Errorf("found %d divert containers, want at least 6 (template, operator, example pod's two, gc, node)", n)
	}
}

// The injection template has one source, divert-init-template.yaml: the IstioOperator is
// generated from it, byte for byte (make manifests).
func TestOperatorGeneratedFromTemplate(t *testing.T) {
	tmpl := readFile(t, gen.TemplatePath)
	op := readFile(t, gen.OperatorPath)
	if want := gen.Operator(tmpl); !bytes.Equal(op, want) {
		t.Errorf("%s is not what make manifests generates from %s: run make manifests", gen.OperatorPath, gen.TemplatePath)
	}
	if !bytes.Contains(op, []byte("make manifests")) {
		t.Errorf("%s must say how it is regenerated", gen.OperatorPath)
	}
}

// ours are the manifests of init-container mode; they need no hostPath but these two.
var ours = []string{"examples/pod.yaml", "gc-daemonset.yaml", "istio/divert-init-template.yaml"}

func TestManifestsParseStrictly(t *testing.T) {
	objs, ops := manifests(t)
	for _, p := range ours {
		if len(objs[p]) == 0 {
			t.Errorf("%s: no objects", p)
		}
	}
	if len(ops) != 1 {
		t.Errorf("want one IstioOperator, got %d", len(ops))
	}
	// Every pod spec anywhere: the API server refuses a privileged container that forbids
	// privilege escalation, and every divert container runs the one image. In ours,
	// hostPath volumes are only the two divert needs.
	for path, list := range objs {
		for _, obj := range list {
			spec := podSpec(obj)
			if spec == nil {
				continue
			}
			for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
				if sc := c.SecurityContext; sc != nil && sc.Privileged != nil && *sc.Privileged &&
					sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
					t.Errorf("%s: container %s is privileged with allowPrivilegeEscalation: false", path, c.Name)
				}
				if gen.IsDivert(c.Image) && c.Image != imageRef {
					t.Errorf("%s: container %s uses %s, want %s", path, c.Name, c.Image, imageRef)
				}
			}
			for _, v := range spec.Volumes {
				if slices.Contains(ours, path) && v.HostPath != nil && v.HostPath.Path != "/sys/fs/cgroup" && v.HostPath.Path != "/sys/fs/bpf" {
					t.Errorf("%s: unexpected hostPath %s", path, v.HostPath.Path)
				}
			}
		}
	}
}

func podSpec(obj runtime.Object) *corev1.PodSpec {
	switch o := obj.(type) {
	case *corev1.Pod:
		return &o.Spec
	case *appsv1.DaemonSet:
		return &o.Spec.Template.Spec
	}
	return nil
}

// checkCaptureContainer checks a container that runs "divert istio-iptables": privileged,
// root, the host's cgroup tree where DIVERT_CGROUP_ROOT says, and the host's bpffs at
// /sys/fs/bpf with Bidirectional propagation (so a bpffs divert mounts reaches the host).
func checkCaptureContainer(t *testing.T, where string, spec *corev1.PodSpec, c corev1.Container) {
	t.Helper()
	if c.Image != imageRef {
		t.Errorf("%s: image %q", where, c.Image)
	}
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || !*sc.Privileged || sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Errorf("%s: must be privileged and run as root: %+v", where, sc)
	} else if sc.AllowPrivilegeEscalation == nil || !*sc.AllowPrivilegeEscalation {
		// Explicitly: Istio's istio-init says false, and a merge would keep that.
		t.Errorf("%s: must set allowPrivilegeEscalation: true", where)
	}
	var cgroupRoot string
	for _, e := range c.Env {
		if e.Name == "DIVERT_CGROUP_ROOT" {
			cgroupRoot = e.Value
		}
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	var cgroupOK, bpffsOK bool
	for _, m := range c.VolumeMounts {
		switch hostPaths[m.Name] {
		case "/sys/fs/cgroup":
			cgroupOK = m.MountPath == cgroupRoot && m.MountPath != "/sys/fs/cgroup"
		case "/sys/fs/bpf":
			bpffsOK = m.MountPath == "/sys/fs/bpf" && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional
		}
	}
	if !cgroupOK {
		t.Errorf("%s: the host's /sys/fs/cgroup must be mounted where $DIVERT_CGROUP_ROOT (%q) says, not over the container's own", where, cgroupRoot)
	}
	if !bpffsOK {
		t.Errorf("%s: the host's /sys/fs/bpf must be mounted at /sys/fs/bpf with mountPropagation Bidirectional", where)
	}
}

// The injection template replaces istio-init's image and privileges and leaves its
// command line to Istio; the IstioOperator carries the same text and selects it.
func TestIstioTemplate(t *testing.T) {
	objs, ops := manifests(t)
	const path = "istio/divert-init-template.yaml"
	pod := objs[path][0].(*corev1.Pod)
	if len(pod.Spec.InitContainers) != 1 || len(pod.Spec.Containers) != 0 {
		t.Fatalf("%s: want exactly the istio-init container, got %+v", path, pod.Spec)
	}
	c := pod.Spec.InitContainers[0]
	if c.Name != "istio-init" {
		t.Errorf("%s: the container must be named istio-init to merge onto Istio's, got %q", path, c.Name)
	}
	if len(c.Command) != 0 || len(c.Args) != 0 {
		t.Errorf("%s: must keep Istio's command line (the image's entrypoint runs it), sets %v %v", path, c.Command, c.Args)
	}
	checkCaptureContainer(t, path, &pod.Spec, c)

	text := readFile(t, path)
	for p, op := range ops {
		w := op.Spec.Values.SidecarInjectorWebhook
		if op.APIVersion != "install.istio.io/v1alpha1" || op.Metadata.Namespace != "istio-system" {
			t.Errorf("%s: %s in %s", p, op.APIVersion, op.Metadata.Namespace)
		}
		if w.Templates["divert"] != string(text) {
			t.Errorf("%s: templates.divert must be %s verbatim", p, path)
		}
		if !slices.Equal(w.DefaultTemplates, []string{"sidecar", "divert"}) {
			t.Errorf("%s: defaultTemplates %v, want [sidecar divert] (divert merges onto sidecar's output)", p, w.DefaultTemplates)
		}
	}
}

// The example pod: the injector's exact command line in a capturing init container,
// validation as the proxy's uid with no privileges, and a proxy running as that uid.
func TestExamplePod(t *testing.T) {
	objs, _ := manifests(t)
	const path = "examples/pod.yaml"
	var pod *corev1.Pod
	configMaps := map[string]bool{}
	for _, obj := range objs[path] {
		switch o := obj.(type) {
		case *corev1.Pod:
			pod = o
		case *corev1.ConfigMap:
			configMaps[o.Name] = true
		}
	}
	if pod == nil || len(pod.Spec.InitContainers) != 2 {
		t.Fatalf("%s: want a pod with two init containers", path)
	}
	capture, validate := pod.Spec.InitContainers[0], pod.Spec.InitContainers[1]
	if !slices.Equal(capture.Args, injectorArgs) {
		t.Errorf("%s: capture args %q, want the injector's %q", path, capture.Args, injectorArgs)
	}
	checkCaptureContainer(t, path+" "+capture.Name, &pod.Spec, capture)
	if len(validate.Args) == 0 || validate.Args[0] != "validate" || validate.Image != imageRef {
		t.Errorf("%s: second init container should run divert validate: %v", path, validate.Args)
	}
	if sc := validate.SecurityContext; sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != 1337 || (sc.Privileged != nil && *sc.Privileged) {
		t.Errorf("%s: validation runs unprivileged as the proxy uid 1337", path)
	}
	var proxyOK bool
	for _, c := range pod.Spec.Containers {
		if sc := c.SecurityContext; sc != nil && sc.RunAsUser != nil && *sc.RunAsUser == 1337 {
			proxyOK = true
		}
	}
	if !proxyOK {
		t.Errorf("%s: no container runs as the proxy uid 1337", path)
	}
	for _, v := range pod.Spec.Volumes {
		if v.ConfigMap != nil && !configMaps[v.ConfigMap.Name] {
			t.Errorf("%s: volume %s names ConfigMap %s, which the file does not define", path, v.Name, v.ConfigMap.Name)
		}
	}
}

// The node agent's DaemonSet: --cgroup-root is where the host's /sys/fs/cgroup is mounted,
// never a path below it that only one cgroup layout has (divert finds the cgroup2 mount
// there, or below it on a hybrid host); bpffs at /sys/fs/bpf with Bidirectional propagation.
func TestNodeDaemonSet(t *testing.T) {
	objs, _ := manifests(t)
	const path = "node/divert-node.yaml"
	var ds *appsv1.DaemonSet
	for _, obj := range objs[path] {
		if o, ok := obj.(*appsv1.DaemonSet); ok {
			ds = o
		}
	}
	if ds == nil {
		t.Fatalf("%s: no DaemonSet", path)
	}
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	// The agent's own binary: divert node would exec it too, after divert's start-up.
	if !slices.Equal(c.Command, []string{"/usr/local/bin/divert-node"}) {
		t.Errorf("%s: command %v, want divert-node", path, c.Command)
	}
	var cgroupRoot string
	for _, a := range c.Args {
		if v, ok := strings.CutPrefix(a, "--cgroup-root="); ok {
			cgroupRoot = v
		}
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	var cgroupMount string
	var bpffsOK bool
	for _, m := range c.VolumeMounts {
		switch hostPaths[m.Name] {
		case "/sys/fs/cgroup":
			cgroupMount = m.MountPath
		case "/sys/fs/bpf":
			bpffsOK = m.MountPath == "/sys/fs/bpf" && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional
		}
	}
	if cgroupMount == "" || cgroupMount == "/sys/fs/cgroup" || cgroupRoot != cgroupMount {
		t.Errorf("%s: --cgroup-root=%q must be where the host's /sys/fs/cgroup is mounted (%q), not over the container's own nor a layout's subdirectory", path, cgroupRoot, cgroupMount)
	}
	if !bpffsOK {
		t.Errorf("%s: the host's /sys/fs/bpf must be mounted at /sys/fs/bpf with mountPropagation Bidirectional", path)
	}
}

// The gc DaemonSet runs divert gc on every node, seeing the host's bpffs.
func TestGCDaemonSet(t *testing.T) {
	objs, _ := manifests(t)
	ds := objs["gc-daemonset.yaml"][0].(*appsv1.DaemonSet)
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	if !strings.Contains(strings.Join(c.Command, " "), "divert gc") || c.Image != imageRef {
		t.Errorf("the container should run divert gc: %v %s", c.Command, c.Image)
	}
	if len(spec.Tolerations) == 0 || spec.Tolerations[0].Operator != corev1.TolerationOpExists {
		t.Errorf("gc must run on every node, tainted ones included")
	}
	var bpffs bool
	for _, m := range c.VolumeMounts {
		bpffs = bpffs || m.MountPath == "/sys/fs/bpf"
	}
	if !bpffs {
		t.Errorf("gc needs the host's bpffs at /sys/fs/bpf")
	}
}

// The image: a static divert from the build stage, iptables for the fallback, divert as
// the entrypoint (Istio's injector passes "istio-iptables ..." as arguments) and an
// istio-iptables link.
func TestDockerfile(t *testing.T) {
	instrs, err := image.Parse(filepath.Join(image.RepoRoot(), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	bc, err := image.FindBuild(instrs)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(bc.Env, "CGO_ENABLED=0") || !slices.Equal(bc.Pkgs, []string{"./cmd/divert", "./cmd/divert-cni", "./cmd/divert-node"}) {
		t.Errorf("build: want CGO_ENABLED=0 go build ... ./cmd/divert ./cmd/divert-cni ./cmd/divert-node, got %+v", bc)
	}
	last := instrs[len(instrs)-1].Stage
	var final []string
	for _, in := range instrs {
		if in.Stage == last {
			final = append(final, in.Cmd+" "+in.Args)
		}
	}
	text := strings.Join(final, "\n")
	for _, want := range []string{
		"FROM debian:12-slim",
		"apt-get install -y --no-install-recommends iptables",
		// divert-node installs the divert-cni next to it (its --plugin-binary default), and
		// divert node execs the divert-node next to divert.
		"COPY --from=build " + bc.OutDir + "divert " + bc.OutDir + "divert-cni " + bc.OutDir + "divert-node /usr/local/bin/",
		"ln -s divert /usr/local/bin/istio-iptables",
		`ENTRYPOINT ["/usr/local/bin/divert"]`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("final stage lacks %q:\n%s", want, text)
		}
	}
}

// The install commands the docs give change divert's template and nothing else: helm
// pinned to the installed istiod chart (without --version, helm upgrade takes the newest
// chart and upgrades istiod), istioctl given the user's installation before divert's
// overlay (alone, the overlay reinstalls Istio's default profile). The privileges are
// stated: the Pod Security level the init container needs, and node mode as the way out.
func TestDocsInstallCommands(t *testing.T) {
	for _, f := range []string{"../README.md", "../docs/istio.md", "../docs/install.md"} {
		b := readFile(t, f)
		text := strings.ReplaceAll(string(b), "\\\n", " ")
		var helm, istioctl int
		for _, l := range strings.Split(text, "\n") {
			if i := strings.Index(l, "helm upgrade istiod"); i >= 0 {
				helm++
				if !strings.Contains(l[i:], "--version ") {
					t.Errorf("%s: %q: helm upgrade without --version upgrades istiod to the newest chart", f, strings.TrimSpace(l))
				}
			}
			if i := strings.Index(l, "istioctl install"); i >= 0 && strings.Contains(l, gen.OperatorPath) {
				istioctl++
				cmd := strings.Fields(l[i:])
				var files []string
				for j, w := range cmd {
					if w == "-f" && j+1 < len(cmd) {
						files = append(files, cmd[j+1])
					}
				}
				if len(files) < 2 || !strings.HasSuffix(files[len(files)-1], gen.OperatorPath) {
					t.Errorf("%s: %q: istioctl install needs the user's installation first and divert's overlay last (%v)", f, strings.TrimSpace(l), files)
				}
			}
		}
		if helm == 0 || istioctl == 0 {
			t.Errorf("%s: want the helm and istioctl install commands, found %d and %d", f, helm, istioctl)
		}
		for _, want := range []string{"privileged", "NET_ADMIN", "pod-security.kubernetes.io/enforce=privileged", "node mode"} {
			if !strings.Contains(strings.ToLower(text), strings.ToLower(want)) {
				t.Errorf("%s: the privileges are not stated: no %q", f, want)
			}
		}
	}
	op := readFile(t, gen.OperatorPath)
	if !bytes.Contains(op, []byte("istioctl install -f <your IstioOperator> -f deploy/"+gen.OperatorPath)) {
		t.Errorf("%s: its comment must show istioctl install with the user's installation first", gen.OperatorPath)
	}
}

// readFile reads path or fails the test.
func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
