package node_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshdivert/divert/node"
	"github.com/meshdivert/divert/node/cniapi"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
)

// cniCallEnv makes the test binary a CNI client: one DEL on the socket it names, the
// answer on stdout, exit 1 on error. Run as another user to knock on the agent's door.
const cniCallEnv = "DIVERT_NODE_TEST_CNI_CALL"

func runCNICallIfRequested() {
	socket := os.Getenv(cniCallEnv)
	if socket == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cniapi.Call(ctx, socket, cniapi.Request{Command: "DEL"})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("reason:", resp.Reason)
	os.Exit(0)
}

// serveAgent starts an agent on a socket in a new directory below dir and waits for it.
func serveAgent(t *testing.T, dir string) string {
	t.Helper()
	socket := filepath.Join(dir, "run", "cni.sock")
	agent := &node.Agent{Client: fake.NewClientset(), NodeName: "node-1", Loader: divertest.BPFFS(t), Defaults: policy.Default()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Serve(ctx, socket) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(socket); err == nil {
			return socket
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the agent's socket never appeared")
	return ""
}

// TestSocketServesRootOnly: the agent's socket is 0600 in a 0700 directory, and even when
// the file modes are opened up (the socket exposed to a pod by a hostPath mount or a
// chmod), a non-root peer is refused (SO_PEERCRED), and so is root in a user namespace (a
// pod's "root" is another uid on the host); the agent keeps serving root throughout.
func TestSocketServesRootOnly(t *testing.T) {
	dir, err := os.MkdirTemp("", "divert-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := serveAgent(t, dir)
	for path, want := range map[string]os.FileMode{filepath.Dir(socket): 0o700, socket: 0o600} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Mode().Perm(); got != want {
			t.Errorf("%s has mode %#o, want %#o", path, got, want)
		}
	}

	rootCall := func() {
		t.Helper()
		resp, err := cniapi.Call(context.Background(), socket, cniapi.Request{Command: "DEL"})
		if err != nil || resp.Reason != "no pod uid" {
			t.Fatalf("root's DEL: %+v, %v", resp, err)
		}
	}
	rootCall()

	// Only SO_PEERCRED stands in the way from here on.
	for path, mode := range map[string]os.FileMode{dir: 0o755, filepath.Dir(socket): 0o755, socket: 0o666} {
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name string
		attr *syscall.SysProcAttr
	}{
		{"uid 1000", &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: divertest.AppUID, Gid: divertest.AppUID}}},
		// Root in its own user namespace, uid 1000 outside, as a pod with hostUsers: false.
		// setuid(0) after the map is written (Credential) makes it uid 1000 to the kernel:
		// without it the child would keep the parent's (host root's) credentials.
		{"root in a user namespace", &syscall.SysProcAttr{
			Cloneflags:  syscall.CLONE_NEWUSER,
			Credential:  &syscall.Credential{Uid: 0, Gid: 0, NoSetGroups: true},
			UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: divertest.AppUID, Size: 1}},
			GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: divertest.AppUID, Size: 1}},
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			// /proc/self/exe: the test binary, reachable through its 0700 build directory.
			cmd := exec.Command("/proc/self/exe")
			cmd.Env = []string{cniCallEnv + "=" + socket}
			cmd.Dir = "/"
			cmd.SysProcAttr = c.attr
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.Contains(string(out), "403 Forbidden") || !strings.Contains(string(out), "serves root only, not uid 1000") {
				t.Errorf("a %s client got %q (%v), want a refusal naming its uid", c.name, out, err)
			}
			rootCall()
		})
	}
}
