package initmode

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/image"
)

// In the image, divert node (older manifests' command) becomes the divert-node next to divert
// (links resolved), with the arguments after "node" and the environment as they are: its
// --help is the agent's own, its exit code the agent's; without divert-node there, one line
// names it and where it looked. Here, not in cmd/divert, whose tests also run in VM guests
// without a Go toolchain to build the image's binaries.
func TestNodeExecsDivertNode(t *testing.T) {
	divert := image.Divert(t) // the image's binaries, divert-node beside divert
	agentHelp := output(t, exec.Command(filepath.Join(filepath.Dir(divert), "divert-node"), "--help"))
	if !strings.Contains(agentHelp, "--node-name") || !strings.Contains(agentHelp, "divert-node [flags]") {
		t.Fatalf("divert-node --help is not the agent's:\n%s", agentHelp)
	}
	// Through a link elsewhere, as /usr/local/bin/istio-iptables is one to divert.
	link := filepath.Join(t.TempDir(), "divert")
	if err := os.Symlink(divert, link); err != nil {
		t.Fatal(err)
	}
	if got := output(t, exec.Command(link, "node", "--help")); got != agentHelp {
		t.Errorf("divert node --help (through a link) is not divert-node's:\n%s", got)
	}

	// A stand-in divert-node shows what it was given.
	dir := t.TempDir()
	copied := copyFile(t, divert, filepath.Join(dir, "divert"))
	stand := filepath.Join(dir, "divert-node")
	if err := os.WriteFile(stand, []byte("#!/bin/sh\nprintf '%s\\n' \"$0\" \"$@\" \"NODE_NAME=$NODE_NAME\"\nexit 7\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(copied, "node", "--node-name", "a b", "-p", "15001", "--help")
	cmd.Env = append(os.Environ(), "NODE_NAME=n1")
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 7 {
		t.Errorf("want the stand-in's exit code 7, got %v", err)
	}
	if want := stand + "\n--node-name\na b\n-p\n15001\n--help\nNODE_NAME=n1\n"; out.String() != want {
		t.Errorf("divert-node was given\n%q\nwant\n%q", out.String(), want)
	}

	// Missing: one line naming divert-node and the path looked at; nothing run.
	if err := os.Remove(stand); err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(copied, "node", "--node-name", "n1")
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	err = cmd.Run()
	msg := stderr.String()
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || strings.Count(msg, "\n") != 1 ||
		!strings.Contains(msg, "looked for "+stand) || !strings.Contains(msg, "divert node runs divert-node") {
		t.Errorf("want exit 1 and one line naming divert-node and %s, got %v: %q", stand, err, msg)
	}
}

func output(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v", strings.Join(cmd.Args, " "), err)
	}
	return string(out)
}

func copyFile(t *testing.T, src, dst string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err == nil {
		err = os.WriteFile(dst, b, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	return dst
}
