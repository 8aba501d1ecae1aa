package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// repoTool builds a command from one of the repository's own tool modules (tools/helm:
// Helm; test/k8s/istio: Istio's injector) into the cache directory, once per run. The go
// build cache makes a rebuild of an unchanged module a link at most.
func repoTool(module, name string) (string, error) {
	toolsMu.Lock()
	defer toolsMu.Unlock()
	if p, ok := tools[name]; ok {
		return p, nil
	}
	out := filepath.Join(*flagCache, "tools", name)
	start := time.Now()
	// Default flags, as make test and make manifests build tools/helm: the packages they
	// compiled are reused from the build cache.
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, ".")
	cmd.Dir = filepath.Join("..", "..", "..", module)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", module, err, b)
	}
	logf("built %s from %s in %s", name, module, time.Since(start).Round(100*time.Millisecond))
	tools[name] = out
	return out, nil
}

var (
	toolsMu sync.Mutex
	tools   = map[string]string{}
)

// helm runs Helm v4 (tools/helm) against the cluster.
func helm(args ...string) (string, error) {
	bin, err := repoTool("tools/helm", "helm")
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, bin, append([]string{"--kubeconfig", suite.c.Kubeconfig}, args...)...)
	// Helm's caches and config in the cluster's state, not the user's home.
	h := filepath.Join(suite.c.State, "helm")
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+h+"/cache", "HELM_CONFIG_HOME="+h+"/config", "HELM_DATA_HOME="+h+"/data")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// tagImage gives an image already in the cluster's containerd another name (as pushing one
// build under a new tag would).
func tagImage(src, dst string) error {
	out, err := exec.Command("ctr", "--address", suite.c.ContainerdSock, "-n", "k8s.io", "images", "tag", "--force", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images tag %s %s: %v\n%s", src, dst, err, out)
	}
	return nil
}
