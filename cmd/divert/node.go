package main

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"
)

// nodeBinary is the node agent's own binary. The agent is not linked into divert: its
// Kubernetes libraries tripled the start-up every init container pays (issue 24).
const nodeBinary = "divert-node"

// newNodeCmd keeps `divert node` for users and manifests from before the agent had its own
// binary: it becomes divert-node (exec, so signals and the exit code are the agent's), with
// the arguments after "node" and this environment, as they are; so --help is the agent's.
func newNodeCmd(e env) *cobra.Command {
	return &cobra.Command{
		Use:                "node [flags] [default policy flags]",
		Short:              "Run the node agent: execs " + nodeBinary + ", next to this binary (DaemonSet mode)",
		DisableFlagParsing: true,
		RunE: func(_ *cobra.Command, args []string) error {
			bin, err := nodeBinaryPath()
			if err != nil {
				return err
			}
			err = syscall.Exec(bin, append([]string{bin}, args...), os.Environ())
			return fmt.Errorf("divert node runs %s: exec %s: %w", nodeBinary, bin, err)
		},
	}
}

// nodeBinaryPath is divert-node in this binary's directory, links resolved: the image links
// /usr/local/bin/istio-iptables to divert, and a user may link divert anywhere.
func nodeBinaryPath() (string, error) {
	self, err := os.Executable()
	if err == nil {
		self, err = filepath.EvalSymlinks(self)
	}
	if err != nil {
		return "", fmt.Errorf("divert node runs %s next to divert, but divert's own path is unknown: %w; run %s directly", nodeBinary, err, nodeBinary)
	}
	bin := filepath.Join(filepath.Dir(self), nodeBinary)
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("divert node runs %s, which is not next to divert (looked for %s): install it there from divert's image or release, or run it directly", nodeBinary, bin)
	}
	return bin, nil
}
