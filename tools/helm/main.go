// Command helm is Helm v4 itself (helm.sh/helm/v4's cmd/helm, pinned in go.mod), for
// machines without a helm binary: `go run ./tools/helm template ...` or, built once,
// `go build -o bin/helm ./tools/helm`. make manifests and make e2e-k8s use it.
package main

import (
	"errors"
	"log/slog"
	"os"

	helmcmd "helm.sh/helm/v4/pkg/cmd"
	"helm.sh/helm/v4/pkg/kube"
	// Client auth plugins, as cmd/helm links them.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
)

func main() {
	// The field manager helm's own binary records (cmd/helm does the same).
	kube.ManagedFieldsManager = "helm"
	cmd, err := helmcmd.NewRootCmd(os.Stdout, os.Args[1:], helmcmd.SetupLogging)
	if err != nil {
		slog.Warn("command failed", slog.Any("error", err))
		os.Exit(1)
	}
	if err := cmd.Execute(); err != nil {
		if cerr, ok := errors.AsType[helmcmd.CommandError](err); ok {
			os.Exit(cerr.ExitCode)
		}
		os.Exit(1)
	}
}
