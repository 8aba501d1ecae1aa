// Command testapp is the one static binary behind the Kubernetes e2e test images (see
// test/k8s/README.md). It reuses test/testpod's helpers, so pods in the real cluster run
// exactly the server, client and transparent proxy the simulated-pod suites run:
//
//	testapp server --name N --listen IP:PORT       write one JSON hop line per connection
//	testapp proxy  --name N --mode forward --listen 0.0.0.0:15001 --listen 0.0.0.0:15006 \
//	               --inbound-src 127.0.0.6         read SO_ORIGINAL_DST, dial it, relay
//	testapp client --target IP:PORT ...            print one JSON result per target
//	testapp dns --kind go|udp|tcp NAME             resolve NAME; who answered, from where
//	testapp id                                     uid, gid, cgroup v2 path, netns inode
//	testapp pause                                  the pod sandbox process
//
// With ISTIO_META_DNS_CAPTURE=true in its environment the proxy also serves DNS on
// 127.0.0.1:15053, as istio-agent does in the istio-proxy container (dns.go).
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshdivert/divert/test/testpod"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "pause" {
		pause()
	}
	if len(os.Args) > 1 && os.Args[1] == "proxy" && dnsCaptureOn() {
		// Listening before the proxy prints its ready line, which the tests wait for.
		if err := startDNSAgent(flagValue(os.Args[2:], "--name")); err != nil {
			fmt.Fprintf(os.Stderr, "testapp proxy: DNS agent on %s: %v\n", agentListen, err)
			os.Exit(1)
		}
	}
	// Always a helper (testpod's, and dns): an unknown command exits 2 naming them all.
	testpod.RunHelper(testpod.Helpers{"dns": runDNS})
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

// flagValue is the value of a "--flag value" pair in args ("" if absent).
func flagValue(args []string, flag string) string {
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}
