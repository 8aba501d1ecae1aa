package image

import (
	"os/exec"
	"strings"
	"testing"
)

// divert is every pod's init container: its start-up is on the pod's path. Kubernetes'
// libraries (the node agent's, cmd/divert-node) cost two thirds of it in package init and
// page faults (issue 24), so neither they nor package node (only its k8s-free subpackages)
// may come back into divert's build by accident. A build check beside the Dockerfile's,
// run on the host (cmd/divert's tests also run in VM guests, without a Go toolchain).
func TestNoKubernetesInDivert(t *testing.T) {
	deps := goListDeps(t, "github.com/meshdivert/divert/cmd/divert")
	// The list is the real one: divert's own subpackages are in it.
	if !deps["github.com/meshdivert/divert/node/handback"] || !deps["github.com/spf13/cobra"] {
		t.Fatalf("go list -deps lacks node/handback or cobra: not divert's dependencies?")
	}
	for p := range deps {
		if isKubernetes(p) || p == "github.com/meshdivert/divert/node" {
			t.Errorf("cmd/divert depends on %s: keep Kubernetes in cmd/divert-node (see go mod why -m or go list -deps -f '{{.ImportPath}} {{.Imports}}')", p)
		}
	}
	// The check does see them where they are.
	agent := goListDeps(t, "github.com/meshdivert/divert/cmd/divert-node")
	if !agent["k8s.io/client-go/kubernetes"] || !agent["github.com/meshdivert/divert/node"] {
		t.Errorf("cmd/divert-node's dependencies lack client-go or package node")
	}
}

func isKubernetes(p string) bool {
	return strings.HasPrefix(p, "k8s.io/") || strings.HasPrefix(p, "sigs.k8s.io/") || strings.HasPrefix(p, "github.com/gogo/protobuf/")
}

func goListDeps(t *testing.T, pkg string) map[string]bool {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	deps := map[string]bool{}
	for _, p := range strings.Fields(string(out)) {
		deps[p] = true
	}
	return deps
}
