package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// KubeVersion is the Kubernetes release the cluster runs; test/k8s/kube/go.mod pins the
// same version (k8s.io/kubernetes v1.34.4, staging modules v0.34.4).
const KubeVersion = "v1.34.4"

// kubeCommands are the Kubernetes commands the cluster runs. All six are one binary,
// test/k8s/kube/cmd/kube (a module of its own), which runs the command it is named as:
// the cache directory holds that binary as "kube" and one symlink to it per command, so
// each process's command line still starts with the command's own name.
var kubeCommands = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"}

// kubePackage is the multi-call main package, relative to test/k8s/kube.
const kubePackage = "./cmd/kube"

// CoreDNSVersion is the CoreDNS release the cluster's DNS runs; test/k8s/coredns/go.mod
// requires the same version.
const CoreDNSVersion = "v1.15.0"

// corednsPackage is CoreDNS's main with the cluster's plugins, relative to test/k8s/coredns.
const corednsPackage = "./cmd/coredns"

// Binaries are the paths of everything the cluster and the tests run.
type Binaries struct {
	APIServer, ControllerManager, Scheduler, Kubelet, Proxy, Kubectl string
	CoreDNS                                                          string
	Divert, DivertCNI, DivertNode, Testapp                           string
}

// BuildResult says what a build did, for the timing table.
type BuildResult struct {
	Kube          time.Duration
	KubeCached    bool // the binaries came from the cache directory without running go build
	CoreDNS       time.Duration
	CoreDNSCached bool
	Repo          time.Duration
}

// kubeLdflags sets the version the way Kubernetes' own build does, so the binaries report
// v1.34.4 (the kubelet and the apiserver compare versions); -s -w halves the link time.
func kubeLdflags() string {
	major, minor, _ := strings.Cut(strings.TrimPrefix(KubeVersion, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	return strings.Join([]string{
		"-s", "-w",
		"-X k8s.io/component-base/version.gitVersion=" + KubeVersion,
		"-X k8s.io/component-base/version.gitMajor=" + major,
		"-X k8s.io/component-base/version.gitMinor=" + minor,
		"-X k8s.io/component-base/version.gitTreeState=clean",
	}, " ")
}

// Build builds the Kubernetes binary and CoreDNS (each once per cache key: the result is
// kept in <cache>/kube-<version>-<key>/ and <cache>/coredns-<version>-<key>/) and, every
// time, divert and the test app from the repository at repo, static (CGO_ENABLED=0) as an
// image carries them.
func Build(ctx context.Context, repo, cache, out string, logf func(string, ...any)) (Binaries, BuildResult, error) {
	var res BuildResult
	var bins Binaries
	kube := cachedBuild{
		name: "kube", version: KubeVersion, mod: filepath.Join(repo, "test", "k8s", "kube"),
		pkg: kubePackage, flags: kubeBuildFlags(), links: kubeCommands,
		what: fmt.Sprintf("Kubernetes %s (one binary for %s)", KubeVersion, strings.Join(kubeCommands, ", ")),
	}
	dir, err := kube.run(ctx, cache, logf, &res.Kube, &res.KubeCached)
	if err != nil {
		return bins, res, err
	}
	// The symlinks made by the build, one per command (all the one binary).
	bins.APIServer = filepath.Join(dir, "kube-apiserver")
	bins.ControllerManager = filepath.Join(dir, "kube-controller-manager")
	bins.Scheduler = filepath.Join(dir, "kube-scheduler")
	bins.Kubelet = filepath.Join(dir, "kubelet")
	bins.Proxy = filepath.Join(dir, "kube-proxy")
	bins.Kubectl = filepath.Join(dir, "kubectl")

	coredns := cachedBuild{
		name: "coredns", version: CoreDNSVersion, mod: filepath.Join(repo, "test", "k8s", "coredns"),
		pkg: corednsPackage, flags: corednsBuildFlags(),
		what: "CoreDNS " + CoreDNSVersion,
	}
	if dir, err = coredns.run(ctx, cache, logf, &res.CoreDNS, &res.CoreDNSCached); err != nil {
		return bins, res, err
	}
	bins.CoreDNS = filepath.Join(dir, "coredns")

	start := time.Now()
	if err := os.MkdirAll(out, 0o755); err != nil {
		return bins, res, err
	}
	bins.Divert = filepath.Join(out, "divert")
	bins.DivertCNI = filepath.Join(out, "divert-cni")
	bins.DivertNode = filepath.Join(out, "divert-node")
	bins.Testapp = filepath.Join(out, "testapp")
	// divert, divert-cni and divert-node exactly as the Dockerfile's build stage makes them
	// (test/k8s/imagebuild reads the Dockerfile's go build line).
	if err := goCmd(ctx, repo, "run", "./test/k8s/imagebuild", "-o", out); err != nil {
		return bins, res, fmt.Errorf("building divert: %w", err)
	}
	if err := goCmd(ctx, repo, "build", "-trimpath", "-ldflags=-s -w", "-o", bins.Testapp, "./test/k8s/testapp"); err != nil {
		return bins, res, fmt.Errorf("building testapp: %w", err)
	}
	res.Repo = time.Since(start)
	return bins, res, nil
}

// kubeBuildFlags are the go build flags of the Kubernetes binary. The compiler flags make a
// cold build cheaper without changing the code (docs/ci.md has the measurements):
// -dwarf=false skips debug information that -ldflags=-w would drop at link anyway, and
// -d=gcstart=1000 lets each compile grow its heap to 1000 MiB before collecting (the default
// is 128). Together they take about 30% off compiling the biggest packages and 15% off the
// whole cold build. Code is optimised as usual: no -N -l.
func kubeBuildFlags() []string {
	return []string{"-mod=readonly", "-trimpath", "-gcflags=all=-dwarf=false -d=gcstart=1000", "-ldflags", kubeLdflags()}
}

// corednsBuildFlags are the Kubernetes binary's flags (same reasoning), with CoreDNS's own
// version variable in place of Kubernetes'.
func corednsBuildFlags() []string {
	return []string{"-mod=readonly", "-trimpath", "-gcflags=all=-dwarf=false -d=gcstart=1000",
		"-ldflags", "-s -w -X github.com/coredns/coredns/coremain.GitCommit=" + CoreDNSVersion}
}

// cachedBuild is one binary built from a wrapper module of its own (test/k8s/kube,
// test/k8s/coredns) and kept in <cache>/<name>-<version>-<key>/ between runs.
type cachedBuild struct {
	name, version string
	mod, pkg      string   // the module's directory, the main package in it
	flags         []string // go build flags
	links         []string // symlinks to the binary made next to it (a multi-call binary's commands)
	what          string   // for the log
}

// run returns the directory holding the binary, building it unless the cache has it.
func (b cachedBuild) run(ctx context.Context, cache string, logf func(string, ...any), took *time.Duration, cached *bool) (string, error) {
	start := time.Now()
	defer func() { *took = time.Since(start) }()
	key, err := b.cacheKey(ctx)
	if err != nil {
		return "", err
	}
	prefix := b.name + "-" + b.version + "-"
	dir := filepath.Join(cache, prefix+key)
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err == nil {
		*cached = true
		now := time.Now()
		_ = os.Chtimes(filepath.Join(dir, ".complete"), now, now) // in use: see staleAfter
		return dir, nil
	}
	logf("building %s into %s; the first build takes minutes", b.what, dir)
	tmp := dir + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", err
	}
	args := append([]string{"build"}, b.flags...)
	args = append(args, "-o", filepath.Join(tmp, b.name), b.pkg)
	if err := goCmd(ctx, b.mod, args...); err != nil {
		return "", fmt.Errorf("building %s: %w", b.what, err)
	}
	for _, c := range b.links {
		if err := os.Symlink(b.name, filepath.Join(tmp, c)); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(b.version+"\n"), 0o644); err != nil {
		return "", err
	}
	_ = os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	// Other builds (another version or go.sum) unused for a while are of no further use.
	// One used lately may be another checkout's on this machine, whose cluster may be
	// running from it right now.
	olds, _ := filepath.Glob(filepath.Join(cache, b.name+"-*"))
	for _, o := range olds {
		st, err := os.Stat(filepath.Join(o, ".complete"))
		if err != nil { // a build in progress (".tmp"), or one that died
			st, err = os.Stat(o)
		}
		if o != dir && err == nil && time.Since(st.ModTime()) > staleAfter {
			_ = os.RemoveAll(o)
		}
	}
	return dir, nil
}

// staleAfter is how long a cached build may go unused before another build removes it.
const staleAfter = 24 * time.Hour

// cacheKey changes whenever what would be built changes: the wrapper module's requirements
// and its own Go files (the main), the Go toolchain, the build flags, the package built and
// the commands linked to it.
func (b cachedBuild) cacheKey(ctx context.Context) (string, error) {
	h := sha256.New()
	files := []string{"go.mod", "go.sum"}
	err := filepath.WalkDir(b.mod, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".go") {
			rel, err := filepath.Rel(b.mod, p)
			if err != nil {
				return err
			}
			files = append(files, rel)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	for _, f := range files { // WalkDir's order is lexical: the key is stable
		data, err := os.ReadFile(filepath.Join(b.mod, f))
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d\n", filepath.ToSlash(f), len(data))
		h.Write(data)
	}
	v, err := exec.CommandContext(ctx, "go", "version").Output()
	if err != nil {
		return "", fmt.Errorf("go version: %w", err)
	}
	h.Write(v)
	fmt.Fprintf(h, "CGO_ENABLED=0 %q %s %q\n", b.flags, b.pkg, b.links)
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

// goCmd runs the go command in dir with cgo off: static binaries, no C toolchain needed.
func goCmd(ctx context.Context, dir string, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go %s (in %s): %v\n%s", strings.Join(args, " "), dir, err, tail(out, 30))
	}
	return nil
}
