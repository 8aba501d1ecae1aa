// Command divert-node is divert's node agent, run once per node by a DaemonSet
// (deploy/node, the Helm chart). It is its own binary because it alone needs Kubernetes'
// client libraries: linked into divert, their package init and page faults were two thirds
// of every init container's start-up (issue 24). `divert node` execs this binary.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/meshdivert/divert/internal/clierr"
)

// env is everything the agent's CLI touches of the outside world, so tests can drive it
// in-process.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], env{stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}); err != nil {
		// One line: the error names the flag and the fix.
		fmt.Fprintln(os.Stderr, "divert-node: "+strings.ReplaceAll(err.Error(), "\n", " "))
		code := 1
		var coded interface{ ExitCode() int }
		if errors.As(err, &coded) {
			code = coded.ExitCode()
		}
		os.Exit(code)
	}
}

func run(ctx context.Context, args []string, e env) error {
	root := newRootCmd(e)
	root.SetArgs(args)
	return clierr.FlagNamed(root.ExecuteContext(ctx))
}
