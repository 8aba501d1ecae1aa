package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// KubeVersion is the Kubernetes release the cluster runs; test/k8s/kube/go.mod pins the
// same version (k8s.io/kubernetes v1.34.4, staging modules v0.34.4).
const KubeVersion = "v1.34.4"

// kubeCommands are built from test/k8s/kube, a module of its own.
var kubeCommands = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"}

// Binaries are the paths of everything the cluster and the tests run.
type Binaries struct {
	APIServer, ControllerManager, Scheduler, Kubelet, Kubectl string
	Divert, DivertCNI, Testapp                                string
}

// BuildResult says what a build did, for the timing table.
type BuildResult struct {
	Kube       time.Duration
	KubeCached bool // the binaries came from the cache directory without running go build
	Repo       time.Duration
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

// Build builds the Kubernetes binaries (once per go.mod/go.sum/Go version: the result is
// kept in <cache>/kube-<version>-<key>/) and, every time, divert and the test app from the
// repository at repo, static (CGO_ENABLED=0) as an image carries them.
func Build(ctx context.Context, repo, cache, out string, logf func(string, ...any)) (Binaries, BuildResult, error) {
	var res BuildResult
	var bins Binaries
	kubeMod := filepath.Join(repo, "test", "k8s", "kube")
	key, err := kubeCacheKey(ctx, kubeMod)
	if err != nil {
		return bins, res, err
	}
	dir := filepath.Join(cache, "kube-"+KubeVersion+"-"+key)
	start := time.Now()
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err == nil {
		res.KubeCached = true
	} else {
		logf("building Kubernetes %s (%s) into %s; the first build takes minutes", KubeVersion, strings.Join(kubeCommands, ", "), dir)
		tmp := dir + ".tmp"
		_ = os.RemoveAll(tmp)
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			return bins, res, err
		}
		args := []string{"build", "-mod=readonly", "-trimpath", "-ldflags", kubeLdflags(), "-o", tmp + "/"}
		for _, c := range kubeCommands {
			args = append(args, "k8s.io/kubernetes/cmd/"+c)
		}
		if err := goCmd(ctx, kubeMod, args...); err != nil {
			return bins, res, fmt.Errorf("building Kubernetes: %w", err)
		}
		if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(KubeVersion+"\n"), 0o644); err != nil {
			return bins, res, err
		}
		_ = os.RemoveAll(dir)
		if err := os.Rename(tmp, dir); err != nil {
			return bins, res, err
		}
		// Older builds (another version or go.sum) are of no further use.
		olds, _ := filepath.Glob(filepath.Join(cache, "kube-*"))
		for _, o := range olds {
			if o != dir {
				_ = os.RemoveAll(o)
			}
		}
	}
	res.Kube = time.Since(start)
	bins.APIServer = filepath.Join(dir, "kube-apiserver")
	bins.ControllerManager = filepath.Join(dir, "kube-controller-manager")
	bins.Scheduler = filepath.Join(dir, "kube-scheduler")
	bins.Kubelet = filepath.Join(dir, "kubelet")
	bins.Kubectl = filepath.Join(dir, "kubectl")

	start = time.Now()
	if err := os.MkdirAll(out, 0o755); err != nil {
		return bins, res, err
	}
	bins.Divert = filepath.Join(out, "divert")
	bins.DivertCNI = filepath.Join(out, "divert-cni")
	bins.Testapp = filepath.Join(out, "testapp")
	// divert and divert-cni exactly as the Dockerfile's build stage makes them
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

// kubeCacheKey changes whenever what would be built changes: the wrapper module's
// requirements, the Go toolchain, or the link flags.
func kubeCacheKey(ctx context.Context, kubeMod string) (string, error) {
	h := sha256.New()
	for _, f := range []string{"go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(kubeMod, f))
		if err != nil {
			return "", err
		}
		h.Write(b)
	}
	v, err := exec.CommandContext(ctx, "go", "version").Output()
	if err != nil {
		return "", fmt.Errorf("go version: %w", err)
	}
	h.Write(v)
	h.Write([]byte(kubeLdflags()))
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
