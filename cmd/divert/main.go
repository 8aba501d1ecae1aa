// Command divert redirects a pod's TCP connections to its sidecar proxy with eBPF, the way
// istio-iptables does with nat rules. See README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/meshdivert/divert/internal/clierr"
	"github.com/meshdivert/divert/internal/version"
	"github.com/meshdivert/divert/istioinit"

	"github.com/spf13/cobra"
)

// env is everything the CLI touches of the outside world, so tests can drive it in-process.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	// lookupUser finds istio's proxy user by name; nil is user.Lookup.
	lookupUser func(string) (*user.User, error)
	// istio is what istio-iptables mode touches of the machine; nil is istioinit.Host().
	// Its Stdout, Stderr and Getenv are these.
	istio *istioinit.Env
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	e := env{stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	args := os.Args[1:]
	// Invoked through a link named istio-iptables, divert is the drop-in for istio-init.
	if filepath.Base(os.Args[0]) == "istio-iptables" {
		args = append([]string{"istio-iptables"}, args...)
	}
	if len(args) > 0 && args[0] == "istio-iptables" {
		shortLived()
	}
	if err := run(ctx, args, e); err != nil {
		// One line: the error names the flag and the fix.
		fmt.Fprintln(os.Stderr, "divert: "+strings.ReplaceAll(err.Error(), "\n", " "))
		code := 1
		var coded interface{ ExitCode() int }
		if errors.As(err, &coded) {
			code = coded.ExitCode() // e.g. 126 for a failed validation, as istio-iptables
		}
		os.Exit(code)
	}
}

// shortLived turns the garbage collector off for a process that exits within a second (the
// init container): collections were a tenth of its run, and it peaks at ~40 MB without them.
// The memory limit brings the collector back should a run ever grow (validation's wait).
func shortLived() {
	debug.SetGCPercent(-1)
	debug.SetMemoryLimit(128 << 20)
}

func run(ctx context.Context, args []string, e env) error {
	root := newRootCmd(e)
	root.SetArgs(args)
	return flagNamed(root.ExecuteContext(ctx))
}

// flagNamed phrases the loader's InputError as the flag of the same name.
func flagNamed(err error) error { return clierr.FlagNamed(err) }

// oneLine is err, flag-named, on one line.
func oneLine(err error) string { return clierr.OneLine(err) }

func newRootCmd(e env) *cobra.Command {
	root := &cobra.Command{
		Use:   "divert",
		Short: "eBPF traffic redirection for service-mesh sidecars",
		Long: `divert captures a pod's TCP connections for its sidecar proxy, as istio-iptables does,
but with eBPF programs attached to the pod's cgroup instead of nat rules:

  outbound  connect() by the app is rewritten to 127.0.0.1:15001 (-p); the proxy reads the
            original destination with getsockopt(SO_ORIGINAL_DST), unmodified;
  bypass    the proxy's own uid/gid (-u/-g), 127.0.0.6-bound sources, localhost, excluded
            ports (-o) and CIDRs (-x) are left alone, exactly as istio-iptables does.

Policy flags are istio-iptables' flags (short and long) and environment variables.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.String(),
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.SetOut(e.stdout)
	root.SetErr(e.stderr)
	root.AddCommand(newAttachCmd(e), newDetachCmd(e), newStatusCmd(e), newExplainCmd(e), newIptablesCmd(e), newNodeCmd(e),
		newIstioIptablesCmd(e), newValidateCmd(e), newGCCmd(e), newToIptablesCmd(e), newTraceCmd(e))
	return root
}
