package testpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The helper protocol, the one way a test puts a process into a pod (Pod.Start,
// Network.Start): the test binary re-executes itself with helperEnv=1 and a command line
// whose first word names a Helper. A helper that serves says so with one Ready line on
// stdout before anything else (Proc.WaitReady waits for it), reports on stdout (usually
// JSON lines), explains failures on stderr and exits non-zero on error. testpod's own
// commands (server, proxy, client, ...) and another package's (the benchmark's) run the
// same way, from the same TestMain call.
const (
	helperEnv = "DIVERT_TESTPOD_HELPER"
	readyLine = "ready"
)

// A Helper is one helper command: it gets the arguments after its name.
type Helper func(args []string) error

// Helpers names helper commands.
type Helpers map[string]Helper

// builtin are testpod's own helpers.
var builtin = Helpers{
	"server": runServer,
	"proxy":  runProxy,
	"client": runClient,
	"id":     runID,
	"udp":    runUDP,

	"udp-server": runUDPServer,
	"query":      runQuery,
	"resolve":    runResolve,

	"burst-app":   runBurstApp,
	"burst-proxy": runBurstProxy,
	"soak-app":    runSoakApp,
	"soak-proxy":  runSoakProxy,
}

// RunHelperIfRequested turns the test binary into a helper process when testpod started it
// that way; otherwise it returns at once. more are the calling package's own helpers, next
// to testpod's. Call it first thing in TestMain:
//
//	func TestMain(m *testing.M) {
//		testpod.RunHelperIfRequested()
//		os.Exit(m.Run())
//	}
func RunHelperIfRequested(more ...Helpers) {
	if os.Getenv(helperEnv) != "1" {
		return
	}
	RunHelper(more...)
}

// RunHelper runs the helper that os.Args names and exits: for a binary that is always a
// helper (test/k8s/testapp, a pod's container), or after RunHelperIfRequested's check.
func RunHelper(more ...Helpers) {
	cmds := Helpers{}
	for _, hs := range append([]Helpers{builtin}, more...) {
		for name, h := range hs {
			if _, dup := cmds[name]; dup {
				fmt.Fprintf(os.Stderr, "testpod helper: two helpers named %q\n", name)
				os.Exit(2)
			}
			cmds[name] = h
		}
	}
	if len(os.Args) < 2 || cmds[os.Args[1]] == nil {
		names := make([]string, 0, len(cmds))
		for name := range cmds {
			names = append(names, name)
		}
		slices.Sort(names)
		fmt.Fprintf(os.Stderr, "testpod helper: want one of %s, got %q\n", strings.Join(names, " "), os.Args[1:])
		os.Exit(2)
	}
	if err := cmds[os.Args[1]](os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "testpod helper %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	os.Exit(0)
}

// HelperCommand is the test binary run again as helper args[0] with the arguments after
// it, not started: for a test that must start it its own way (a new user namespace, extra
// files). Pod.Start and Network.Start are the usual way.
func HelperCommand(args ...string) *exec.Cmd {
	cmd := exec.Command("/proc/self/exe", args...)
	helperProcess(cmd)
	return cmd
}

// helperProcess gives cmd a helper's environment and working directory.
func helperProcess(cmd *exec.Cmd) {
	// A minimal environment: the helpers need no HOME or PATH. Under -race, keep the
	// parent's GORACE but skip the race runtime's default 1 s sleep at exit.
	cmd.Env = []string{helperEnv + "=1", "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")}
	cmd.Dir = "/"
}

// Ready tells the test that started this helper that it now serves (Proc.WaitReady
// returns). It must be the helper's first line on stdout.
func Ready() { fmt.Println(readyLine) }

// Serve listens on addr (Listen), says Ready and hands each accepted connection to handle
// on its own goroutine, until accepting fails.
func Serve(addr string, handle func(*net.TCPConn)) error {
	ln, err := Listen(addr)
	if err != nil {
		return err
	}
	Ready()
	return Accept(ln, handle)
}

// Accept hands each connection ln accepts to handle on its own goroutine, until accepting
// fails.
func Accept(ln net.Listener, handle func(*net.TCPConn)) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go handle(c.(*net.TCPConn))
	}
}

// Listen opens a plain TCP listener. Go >= 1.24 makes listeners MPTCP by default, and
// SOCKMAP (used by the eBPF inbound path) refuses MPTCP sockets.
func Listen(addr string) (net.Listener, error) { return listenWith(addr, false, false, false) }

// listenWith optionally sets SO_REUSEPORT, as Envoy does with one listener per worker, and
// IP_TRANSPARENT (IPV6_TRANSPARENT on IPv6 sockets), which iptables TPROXY needs on the
// listener it delivers to. An IPv4 address gets an AF_INET socket; [::] a dual-stack
// AF_INET6 socket (IPV6_V6ONLY off: IPv4 clients arrive as ::ffff:a.b.c.d), unless
// v6only, as Envoy's [::] listener next to a 0.0.0.0 one on the same port; any other IPv6
// address an AF_INET6 socket.
func listenWith(addr string, reuseport, transparent, v6only bool) (net.Listener, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	network := "tcp4"
	switch {
	case ap.Addr().Is6() && (v6only || !ap.Addr().IsUnspecified()):
		network = "tcp6" // Go sets IPV6_V6ONLY on "tcp6" sockets
	case ap.Addr().Is6():
		network = "tcp" // Go's dual-stack wildcard listener
	}
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	lc.Control = func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if reuseport {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}
			if transparent && serr == nil {
				if ap.Addr().Is6() {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
				} else {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
				}
			}
		})
		return errors.Join(err, serr)
	}
	return lc.Listen(context.Background(), network, addr)
}

// TCPNetwork is Go's network name for a plain dial to a: "tcp4" or "tcp6" (an AF_INET6
// socket with IPV6_V6ONLY set, as Go makes them).
func TCPNetwork(a netip.Addr) string {
	if a.Is4() || a.Is4In6() {
		return "tcp4"
	}
	return "tcp6"
}

// udpNetwork is TCPNetwork's UDP counterpart (an IPv4 address as such).
func udpNetwork(a netip.Addr) string {
	if a.Is4() {
		return "udp4"
	}
	return "udp6"
}

// addrsFlag is a helper's flag of comma-separated addresses, as addrsArg writes them.
type addrsFlag []netip.Addr

func (a *addrsFlag) String() string { return addrsArg(*a) }

func (a *addrsFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		addr, err := netip.ParseAddr(s)
		if err != nil {
			return err
		}
		*a = append(*a, addr)
	}
	return nil
}

// addrsArg is addrs as an addrsFlag value.
func addrsArg(addrs []netip.Addr) string {
	s := make([]string, len(addrs))
	for i, a := range addrs {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

// Dialer returns a plain-TCP dialer (never MPTCP, so cgroup hooks see ordinary TCP),
// binding src if it is valid.
func Dialer(timeout time.Duration, src netip.Addr) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	d.SetMultipathTCP(false)
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	return d
}
