package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// Bad input gets one line naming the flag (or variable) and the fix, before the agent
// touches the host or the API server.
func TestBadInputNamesTheFlag(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-kubeconfig")
	for _, c := range []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"no node name", nil, nil, "--node-name"},
		{"bad policy flag", []string{"-p", "0"}, map[string]string{"NODE_NAME": "n1"}, "--envoy-port"},
		{"bad cgroup root", []string{"--cgroup-root", t.TempDir()}, map[string]string{"NODE_NAME": "n1"}, "invalid --cgroup-root"},
		{"bad kubeconfig", []string{"--node-name", "n1", "--cgroup-root", "/sys/fs/cgroup", "--kubeconfig", missing}, nil, "invalid --kubeconfig"},
		{"stray argument", []string{"--node-name", "n1", "extra"}, nil, "extra"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			err := run(context.Background(), c.args, env{stdout: &out, stderr: &errOut, getenv: func(k string) string { return c.env[k] }})
			if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("want one line naming %s, got %v", c.want, err)
			}
		})
	}
}

// The agent's help is divert node's, under its own name.
func TestHelp(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, env{stdout: &out, stderr: &out, getenv: func(string) string { return "" }}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"divert-node [flags] [default policy flags]", "--node-name", "--plugin-binary", "--envoy-port"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, out.String())
		}
	}
}
