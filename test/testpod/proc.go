package testpod

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
)

// ClientTimeout bounds each target of a Dial: connect plus reading until EOF. Inside the
// vmtests guests (VMTEST_GUEST=1) it is 10 s: under TCG on a busy host the guest's vCPUs
// can go unscheduled for seconds (6.12's console logged "clocksource: Long readout
// interval ... cs_nsec: 3172122193" right before one of TestManyConnectionsNoDrops's 10,000
// connections timed out at 3 s), which is no difference worth failing a suite over.
var ClientTimeout = clientTimeout()

func clientTimeout() time.Duration {
	if os.Getenv("VMTEST_GUEST") == "1" {
		return 10 * time.Second
	}
	return 3 * time.Second
}

// readyTimeout bounds how long Start wrappers wait for a helper to listen.
const readyTimeout = 10 * time.Second

// ProcSpec says who runs what. Args is a helper command line, e.g.
// {"server", "--name", "s", "--listen", "0.0.0.0:80"}.
type ProcSpec struct {
	UID, GID uint32
	// Groups are the supplementary groups (none if empty).
	Groups []uint32
	Args   []string
	// Path, if set, runs that executable with Args instead of a helper (e.g. haproxy).
	Path string
	// Caps are ambient capabilities kept across the switch to UID (e.g. CAP_NET_ADMIN
	// for a TPROXY proxy, as Envoy gets it).
	Caps []uintptr
}

// Proc is a helper process started by Pod.Start or Network.Start.
type Proc struct {
	Cmd      *exec.Cmd
	stdout   *outBuf
	stderr   *outBuf
	done     chan struct{} // closed once Cmd.Wait returned
	stop     sync.Once
	reported atomic.Bool // stderr already in a failure message
}

// Start runs spec inside the pod's netns and cgroup.
func (p *Pod) Start(tb testing.TB, spec ProcSpec) *Proc {
	tb.Helper()
	return start(tb, p.NetNSPath, p.CgroupPath, spec)
}

// Start runs spec inside the remote netns and the network's own cgroup, so it is never
// seen by programs attached to a pod cgroup.
func (n *Network) Start(tb testing.TB, spec ProcSpec) *Proc {
	tb.Helper()
	return start(tb, n.NetNSPath, n.CgroupPath, spec)
}

func start(tb testing.TB, netnsPath, cgroupPath string, spec ProcSpec) *Proc {
	tb.Helper()
	cg, err := unix.Open(cgroupPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must(tb, err, "open cgroup")
	defer unix.Close(cg)

	// /proc/self/exe, resolved by the child itself, is the test binary even though it sits
	// in a 0700 /tmp/go-build* dir: the magic link skips the directory search permission an
	// unprivileged uid would need, so no copy of the binary is required.
	path := "/proc/self/exe"
	if spec.Path != "" {
		path = spec.Path
	}
	cmd := exec.Command(path, spec.Args...)
	helperProcess(cmd)
	pr := &Proc{Cmd: cmd, stdout: newOutBuf(), stderr: newOutBuf(), done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = pr.stdout, pr.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Empty Groups with NoSetGroups false means setgroups(0): the helper must not keep
		// root's supplementary groups (xt_owner --suppl-groups and file access would see them).
		Credential:  &syscall.Credential{Uid: spec.UID, Gid: spec.GID, Groups: spec.Groups},
		UseCgroupFD: true, // clone3(CLONE_INTO_CGROUP): born in the cgroup, no window outside
		CgroupFD:    cg,
		// Pdeathsig fires when the forking *thread* exits. nsexec returns that thread to the
		// pool (Go does not retire idle threads), so it only fires if the test process dies.
		Pdeathsig:   syscall.SIGKILL,
		AmbientCaps: spec.Caps,
	}
	must(tb, nsexec.Start(netnsPath, cmd), fmt.Sprintf("start %v", spec.Args))
	go func() {
		_ = cmd.Wait()
		close(pr.done)
	}()
	tb.Cleanup(func() {
		pr.Stop()
		if tb.Failed() && !pr.reported.Load() && pr.stderr.String() != "" {
			tb.Logf("testpod: %v (pid %d) stderr:\n%s", spec.Args, cmd.Process.Pid, pr.stderr)
		}
	})
	return pr
}

// Stop kills the process by PID (if still running) and reaps it. Safe to call twice.
func (pr *Proc) Stop() {
	pr.stop.Do(func() {
		_ = pr.Cmd.Process.Kill()
		<-pr.done
	})
}

// Exited describes how the process ended, or returns "" while it runs.
func (pr *Proc) Exited() string {
	select {
	case <-pr.done:
		return fmt.Sprintf("%v exited (%v), stderr: %q", pr.Cmd.Args[1:], pr.Cmd.ProcessState, pr.stderr.String())
	default:
		return ""
	}
}

// Stdout returns what the process wrote to stdout so far.
func (pr *Proc) Stdout() string { return pr.stdout.String() }

// Stderr returns what the process wrote to stderr so far.
func (pr *Proc) Stderr() string { return pr.stderr.String() }

// Wait waits for the process to exit by itself and returns its stdout; the test fails if
// it takes longer than timeout or exits non-zero.
func (pr *Proc) Wait(tb testing.TB, timeout time.Duration) string {
	tb.Helper()
	select {
	case <-pr.done:
	case <-time.After(timeout):
		pr.Stop()
		pr.reported.Store(true)
		tb.Fatalf("testpod: %v did not exit within %v; stderr:\n%s", pr.Cmd.Args[1:], timeout, pr.stderr)
	}
	if !pr.Cmd.ProcessState.Success() {
		pr.reported.Store(true)
		tb.Fatalf("testpod: %v: %v; stderr:\n%s", pr.Cmd.Args[1:], pr.Cmd.ProcessState, pr.stderr)
	}
	return pr.stdout.String()
}

// WaitReady waits for the helper's Ready line, so that tests never race its listener; the test
// fails if the helper exits first or is not ready within 10 s.
func (pr *Proc) WaitReady(tb testing.TB) *Proc {
	tb.Helper()
	select {
	case <-pr.stdout.ready:
		return pr
	case <-pr.done:
		pr.reported.Store(true)
		tb.Fatalf("testpod: %v exited before ready (%v); stderr:\n%s", pr.Cmd.Args[1:], pr.Cmd.ProcessState, pr.stderr)
	case <-time.After(readyTimeout):
		pr.reported.Store(true)
		tb.Fatalf("testpod: %v not ready after %v; stderr:\n%s", pr.Cmd.Args[1:], readyTimeout, pr.stderr)
	}
	return nil
}

// waitStdout waits until until(stdout so far) holds and returns that stdout; the test fails
// if the process exits first or timeout passes. what names the awaited output.
func (pr *Proc) waitStdout(tb testing.TB, what string, timeout time.Duration, until func(stdout string) bool) string {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if out := pr.Stdout(); until(out) {
			return out
		}
		select {
		case <-pr.done:
			pr.reported.Store(true)
			tb.Fatalf("testpod: %v exited before %q (%v); stdout:\n%s\nstderr:\n%s", pr.Cmd.Args[1:], what, pr.Cmd.ProcessState, pr.stdout, pr.stderr)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			pr.reported.Store(true)
			tb.Fatalf("testpod: %v not at %q after %v; stdout:\n%s\nstderr:\n%s", pr.Cmd.Args[1:], what, timeout, pr.stdout, pr.stderr)
		}
	}
}

// Server starts a server helper in the pod and waits until it listens.
func (p *Pod) Server(tb testing.TB, name string, listen netip.AddrPort, uid, gid uint32) *Proc {
	tb.Helper()
	return p.Start(tb, ProcSpec{UID: uid, GID: gid, Args: serverArgs(name, listen)}).WaitReady(tb)
}

// Server starts a server helper (as root) in the remote netns and waits until it listens.
func (n *Network) Server(tb testing.TB, name string, listen netip.AddrPort) *Proc {
	tb.Helper()
	return n.Start(tb, ProcSpec{Args: serverArgs(name, listen)}).WaitReady(tb)
}

func serverArgs(name string, listen netip.AddrPort) []string {
	return []string{"server", "--name", name, "--listen", listen.String()}
}

// ProxyConfig describes a proxy helper; see Pod.Proxy for the common case.
type ProxyConfig struct {
	Name string
	// Listen: e.g. 0.0.0.0:15001 and 0.0.0.0:15006; [::]:15001 is a dual-stack listener
	// (IPv4 clients as ::ffff:a.b.c.d) unless V6Only.
	Listen   []netip.AddrPort
	Mode     string // "report" or "forward"
	UID, GID uint32
	// InboundSrc, if valid, is bound as source when forwarding connections accepted on a
	// listener whose port is InboundPort (default 15006), as Envoy does with 127.0.0.6;
	// InboundSrc6 (e.g. ::6) likewise for IPv6 original destinations.
	InboundSrc  netip.Addr
	InboundSrc6 netip.Addr
	InboundPort uint16
	// V6Only makes [::] listeners IPv6-only, so they can share their port with a 0.0.0.0
	// listener, as Envoy's additional [::] addresses do in dual stack.
	V6Only bool
	// Reuseport, if > 0, opens that many SO_REUSEPORT listeners per address (Envoy style).
	Reuseport int
	// Transparent sets IP_TRANSPARENT on the listeners (iptables TPROXY mode needs it) and
	// gives the proxy CAP_NET_ADMIN for that.
	Transparent bool
	// OriginalSrcMark, if not 0, makes a forward-mode proxy connect inbound connections to
	// the app from the client's own address (any port) with IP_TRANSPARENT and this SO_MARK,
	// as Envoy's original_src does in TPROXY mode (mark 1337); it gets CAP_NET_ADMIN.
	OriginalSrcMark uint32
	// OriginalSrcDualStack makes those dials from a dual-stack AF_INET6 socket (the client
	// as ::ffff:a.b.c.d), as a proxy with IPv6 sockets for everything would.
	OriginalSrcDualStack bool
}

// Proxy starts a proxy helper listening on one address and waits until it listens.
func (p *Pod) Proxy(tb testing.TB, name string, listen netip.AddrPort, mode string, uid, gid uint32) *Proc {
	tb.Helper()
	return p.StartProxy(tb, ProxyConfig{Name: name, Listen: []netip.AddrPort{listen}, Mode: mode, UID: uid, GID: gid})
}

// StartProxy starts a proxy helper in the pod and waits until all its listeners listen.
func (p *Pod) StartProxy(tb testing.TB, c ProxyConfig) *Proc {
	tb.Helper()
	args := []string{"proxy", "--name", c.Name, "--mode", c.Mode}
	for _, l := range c.Listen {
		args = append(args, "--listen", l.String())
	}
	for _, a := range []netip.Addr{c.InboundSrc, c.InboundSrc6} {
		if a.IsValid() {
			args = append(args, "--inbound-src", a.String())
		}
	}
	if c.V6Only {
		args = append(args, "--v6only")
	}
	if c.Reuseport > 0 {
		args = append(args, "--reuseport", strconv.Itoa(c.Reuseport))
	}
	var caps []uintptr
	if c.Transparent {
		args = append(args, "--transparent")
	}
	if c.OriginalSrcMark != 0 {
		// This process knows the client's timeout (longer in the vmtests guests).
		args = append(args, "--original-src-mark", strconv.FormatUint(uint64(c.OriginalSrcMark), 10),
			"--original-src-timeout", (ClientTimeout / 2).String())
		if c.OriginalSrcDualStack {
			args = append(args, "--original-src-dual-stack")
		}
	}
	if c.Transparent || c.OriginalSrcMark != 0 {
		caps = []uintptr{unix.CAP_NET_ADMIN}
	}
	if c.InboundPort != 0 {
		args = append(args, "--inbound-port", strconv.Itoa(int(c.InboundPort)))
	}
	return p.Start(tb, ProcSpec{UID: c.UID, GID: c.GID, Args: args, Caps: caps}).WaitReady(tb)
}

// Identity is what the id helper reports about itself.
type Identity struct {
	UID    uint32 `json:"uid"`
	GID    uint32 `json:"gid"`
	Groups []int  `json:"groups"`
	Cgroup string `json:"cgroup"` // cgroup v2 path relative to the mount, e.g. /divert-test/x
	NetNS  uint64 `json:"netns"`  // inode of /proc/self/ns/net
}

// Whoami runs the id helper in the pod as uid/gid.
func (p *Pod) Whoami(tb testing.TB, uid, gid uint32) Identity {
	tb.Helper()
	return whoami(tb, p.Start(tb, ProcSpec{UID: uid, GID: gid, Args: []string{"id"}}))
}

// Whoami runs the id helper (as root) in the remote netns.
func (n *Network) Whoami(tb testing.TB) Identity {
	tb.Helper()
	return whoami(tb, n.Start(tb, ProcSpec{Args: []string{"id"}}))
}

func whoami(tb testing.TB, pr *Proc) Identity {
	tb.Helper()
	var id Identity
	out := pr.Wait(tb, readyTimeout)
	must(tb, json.Unmarshal([]byte(out), &id), "decode id output "+out)
	return id
}

// outBuf collects a helper's output and signals its first "ready" line.
type outBuf struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	ready chan struct{}
	seen  bool
}

func newOutBuf() *outBuf { return &outBuf{ready: make(chan struct{})} }

func (b *outBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	if !b.seen && bytes.HasPrefix(b.buf.Bytes(), []byte(readyLine+"\n")) {
		b.seen = true
		close(b.ready)
	}
	return len(p), nil
}

func (b *outBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
