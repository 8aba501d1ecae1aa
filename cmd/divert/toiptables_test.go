package main

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// to-iptables refuses to run while a node agent answers on its socket (it would capture
// the pods again), in one line naming the flag, before touching anything.
func TestToIptablesRefusesRunningAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "cni.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, err = runCLI(t, nil, "to-iptables", "--agent-socket", sock, "--bpffs", t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "--agent-socket "+sock) || !strings.Contains(err.Error(), "helm uninstall") {
		t.Fatalf("want a refusal naming --agent-socket and the fix, got %v", err)
	}
}
