// Command testapp is the one static binary behind the Kubernetes e2e test images (see
// test/k8s/README.md). It reuses test/testpod's helpers, so pods in the real cluster run
// exactly the server, client and transparent proxy the simulated-pod suites run:
//
//	testapp server --name N --listen IP:PORT       write one JSON hop line per connection
//	testapp proxy  --name N --mode forward --listen 0.0.0.0:15001 --listen 0.0.0.0:15006 \
//	               --inbound-src 127.0.0.6         read SO_ORIGINAL_DST, dial it, relay
//	testapp client --target IP:PORT ...            print one JSON result per target
//	testapp id                                     uid, gid, cgroup v2 path, netns inode
//	testapp pause                                  the pod sandbox process
package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/meshdivert/divert/test/testpod"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "pause" {
		pause()
	}
	// testpod's helpers run when this variable says so (normally set by the test binary
	// re-executing itself); here the binary is always a helper.
	os.Setenv("DIVERT_TESTPOD_HELPER", "1")
	testpod.RunHelperIfRequested()
	os.Stderr.WriteString("usage: testapp server|proxy|client|id|udp|pause [flags]\n")
	os.Exit(2)
}

// pause is what the pause image's process does: hold the pod's namespaces, reap children
// (it is pid 1 when the pod shares its pid namespace) and exit cleanly when stopped.
func pause() {
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
