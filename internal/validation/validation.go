// Package validation checks, from inside a pod, that its connections are captured: what
// Istio's istio-validation init container does (istio-iptables --run-validation), for
// either of divert's backends.
//
// It listens where the proxy would (127.0.0.1 on the outbound and inbound ports), connects
// as the proxy uid to 127.0.0.6:<probe port> — a destination in the pod itself, which
// istio's rules (and divert's programs) send to the inbound port — and requires that the
// connection lands on the inbound listener and that getsockopt(SO_ORIGINAL_DST) there
// answers 127.0.0.6:<probe port>. Nothing leaves the pod: every address is loopback.
// Optionally it also checks an outbound destination, as an application uid.
package validation

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/sockio"

	"github.com/meshdivert/divert/internal/origdst"
)

// Config says what to check. Ports and ids follow istio-iptables' flags.
type Config struct {
	// ProxyPort (-p) and InboundCapturePort (-z) are listened on at 127.0.0.1, as the
	// proxy will.
	ProxyPort, InboundCapturePort uint16
	// ProxyUID and ProxyGID (-u, -g): the probe connection is made as them, since only the
	// proxy's connections to the pod itself are sent to the inbound port.
	ProxyUID, ProxyGID uint32
	// ProbePort is dialled on 127.0.0.6 (--iptables-probe-port, default 15002).
	ProbePort uint16
	// Timeout bounds the whole run (--probe-timeout, default 5s); attempts repeat until
	// then, as istio's do, so rules applied a moment later still pass.
	Timeout time.Duration
	// Outbound, if valid, is also dialled as AppUID/AppGID and must land on ProxyPort with
	// itself as the original destination. Use an address whose traffic may leave the pod if
	// capture is broken.
	Outbound       netip.AddrPort
	AppUID, AppGID uint32
}

// probeSource is where istio's validation client binds, and probeDest the address it
// dials: a local destination that is not 127.0.0.1, so the hairpin rule applies.
var (
	probeSource = netip.MustParseAddr("127.0.0.1")
	probeDest   = netip.MustParseAddr("127.0.0.6")
)

// Check is the outcome of one check.
type Check struct {
	// What was checked, e.g. "127.0.0.6:15002 as uid 1337".
	What string
	// OK is true when it landed where it had to with the right original destination.
	OK bool
	// Detail says what happened: the listener and original destination, or the diagnosis.
	Detail string
}

func (c Check) String() string {
	if c.OK {
		return "ok: " + c.What + ": " + c.Detail
	}
	return "FAIL: " + c.What + ": " + c.Detail
}

// accepted is what a listener saw of one connection.
type accepted struct {
	listener uint16
	peer     netip.AddrPort
	orig     netip.AddrPort
	origErr  error
}

// Run performs the checks and returns them; the error is non-nil (one line, the first
// failed check's diagnosis) unless all passed.
func Run(ctx context.Context, cfg Config) ([]Check, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()

	acc := make(chan accepted, 16)
	for _, port := range []uint16{cfg.ProxyPort, cfg.InboundCapturePort} {
		ln, err := listen(netip.AddrPortFrom(probeSource, port))
		if err != nil {
			return nil, fmt.Errorf("cannot listen on %s:%d (%v): validation runs before the proxy starts (as an init container), with the proxy's -p/-z ports",
				probeSource, port, unwrap(err))
		}
		defer ln.Close()
		go serve(ln, port, acc)
	}

	hairpin := netip.AddrPortFrom(probeDest, cfg.ProbePort)
	checks := []Check{check(ctx, acc, fmt.Sprintf("%s as uid %d (the proxy)", hairpin, cfg.ProxyUID),
		cfg.ProxyUID, cfg.ProxyGID, probeSource, hairpin, cfg.InboundCapturePort, "inbound")}
	if cfg.Outbound.IsValid() {
		checks = append(checks, check(ctx, acc, fmt.Sprintf("%s as uid %d (an application)", cfg.Outbound, cfg.AppUID),
			cfg.AppUID, cfg.AppGID, netip.Addr{}, cfg.Outbound, cfg.ProxyPort, "outbound"))
	}
	for _, c := range checks {
		if !c.OK {
			return checks, fmt.Errorf("validation failed: %s: %s", c.What, c.Detail)
		}
	}
	return checks, nil
}

// check dials dst as uid/gid until a connection lands on wantPort with dst as its original
// destination, or ctx ends; the last attempt's outcome is the diagnosis.
func check(ctx context.Context, acc chan accepted, what string, uid, gid uint32, src netip.Addr, dst netip.AddrPort, wantPort uint16, kind string) Check {
	c := Check{What: what}
	for {
		c.Detail = attempt(ctx, acc, uid, gid, src, dst, wantPort, kind)
		if c.Detail == "" {
			c.OK = true
			c.Detail = fmt.Sprintf("captured to the %s port %d, SO_ORIGINAL_DST reads %s", kind, wantPort, dst)
			return c
		}
		select {
		case <-ctx.Done():
			return c
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// attempt makes one connection and returns "" on success, else the diagnosis.
func attempt(ctx context.Context, acc chan accepted, uid, gid uint32, src netip.Addr, dst netip.AddrPort, wantPort uint16, kind string) string {
	deadline, _ := ctx.Deadline()
	fd, local, err := dialAs(uid, gid, src, dst, time.Until(deadline))
	if err != nil {
		var errno syscall.Errno
		switch {
		case errors.As(err, &errno) && errno == unix.ECONNREFUSED:
			return fmt.Sprintf("not captured: connection refused by %s itself (nothing was redirected to port %d); %s", dst, wantPort, notCapturedHint(kind))
		case errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &errno) && (errno == unix.EAGAIN || errno == unix.ETIMEDOUT):
			return fmt.Sprintf("not captured: connecting timed out (nothing was redirected to port %d); %s", wantPort, notCapturedHint(kind))
		}
		return fmt.Sprintf("cannot connect: %v", err)
	}
	defer unix.Close(fd)
	for {
		select {
		case a := <-acc:
			if a.peer.Port() != local.Port() {
				continue // a leftover of an earlier attempt, or someone else's connection
			}
			switch {
			case a.listener != wantPort:
				return fmt.Sprintf("captured to port %d, want the %s port %d: the proxy uid/gid (-u/-g) or the ports (-p/-z) do not match what was attached", a.listener, kind, wantPort)
			case a.origErr != nil:
				return fmt.Sprintf("captured to port %d, but getsockopt(SO_ORIGINAL_DST) fails there (%v): the original destination is unreadable (eBPF: no cgroup/getsockopt program in effect for this cgroup; iptables: no conntrack entry)", wantPort, unwrap(a.origErr))
			case a.orig != dst:
				return fmt.Sprintf("captured to port %d, but SO_ORIGINAL_DST reads %s, want %s", wantPort, a.orig, dst)
			}
			return ""
		case <-time.After(time.Until(deadline)):
			return fmt.Sprintf("connected, but no listener of ours accepted it: %s reached something else", dst)
		}
	}
}

func notCapturedHint(kind string) string {
	if kind == "inbound" {
		return "divert is not attached to this pod (or this process is outside the pod's cgroup), or the istio rules are missing; see divert status and the init container's log"
	}
	return "outbound capture is not in effect for this destination and uid; see divert explain and divert status"
}

func listen(addr netip.AddrPort) (net.Listener, error) {
	var lc net.ListenConfig
	// Go listens with MPTCP by default, and divert's inbound path (a SOCKMAP) refuses MPTCP
	// listeners; the proxy's listeners are plain TCP too.
	lc.SetMultipathTCP(false)
	lc.Control = func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
		return errors.Join(err, serr)
	}
	return lc.Listen(context.Background(), "tcp4", addr.String())
}

// serve reports every accepted connection with its original destination and writes that
// port back, as istio's validation server does, then closes it.
func serve(ln net.Listener, port uint16, acc chan<- accepted) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		a := accepted{listener: port, peer: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
		a.orig, a.origErr = origdst.Get(c.(*net.TCPConn))
		_, _ = fmt.Fprint(c, a.orig.Port())
		c.Close()
		select {
		case acc <- a:
		default: // nobody waits for it: an attempt already gave up
		}
	}
}

// dialAs connects to dst as uid/gid and returns the socket and its local address. Capture
// decisions look at the connecting task's ids (eBPF) or the socket's owner (iptables), so
// when this process is root and the ids differ, one locked OS thread switches to them for
// socket() and connect() and back: raw setresuid/setresgid change only the calling thread,
// unlike Go's syscall.Setresuid, which changes every thread of the process. (The Go
// runtime never clones new threads from a locked one, so nothing inherits the borrowed ids.)
func dialAs(uid, gid uint32, src netip.Addr, dst netip.AddrPort, timeout time.Duration) (int, netip.AddrPort, error) {
	type result struct {
		fd    int
		local netip.AddrPort
		err   error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		ruid, euid, suid := unix.Getresuid()
		rgid, egid, sgid := unix.Getresgid()
		if uint32(ruid) == uid && uint32(euid) == uid && uint32(rgid) == gid && uint32(egid) == gid {
			fd, local, err := connect(src, dst, timeout)
			runtime.UnlockOSThread()
			res <- result{fd, local, err}
			return
		}
		if euid != 0 {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("this process runs as uid %d and cannot connect as uid %d: run it as uid %d (as istio-validation does) or as root", euid, uid, uid)}
			return
		}
		// Group first: once the uid is not 0 the thread has no capability to change it.
		// The saved ids stay root's, which is what allows switching back.
		if err := setresgid(gid, gid, uint32(sgid)); err != nil {
			runtime.UnlockOSThread() // nothing changed
			res <- result{err: err}
			return
		}
		if err := setresuid(uid, uid, uint32(suid)); err != nil {
			if setresgid(uint32(rgid), uint32(egid), uint32(sgid)) == nil {
				runtime.UnlockOSThread()
			}
			res <- result{err: err}
			return
		}
		fd, local, err := connect(src, dst, timeout)
		// Back: the uid first (allowed through the saved uid, and it restores the
		// capabilities), then the gid. If either fails the thread stays locked, and the
		// runtime throws it away when this goroutine ends.
		if setresuid(uint32(ruid), uint32(euid), uint32(suid)) == nil &&
			setresgid(uint32(rgid), uint32(egid), uint32(sgid)) == nil {
			runtime.UnlockOSThread()
		}
		res <- result{fd, local, err}
	}()
	r := <-res
	return r.fd, r.local, r.err
}

func setresuid(r, e, s uint32) error {
	if _, _, errno := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(r), uintptr(e), uintptr(s)); errno != 0 {
		return fmt.Errorf("setresuid(%d, %d, %d): %w", r, e, s, errno)
	}
	return nil
}

func setresgid(r, e, s uint32) error {
	if _, _, errno := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(r), uintptr(e), uintptr(s)); errno != 0 {
		return fmt.Errorf("setresgid(%d, %d, %d): %w", r, e, s, errno)
	}
	return nil
}

// connect makes a blocking TCP connection bound to src (if valid) and leaves it open: the
// listener must read SO_ORIGINAL_DST while the client side still exists (divert forgets a
// redirected connection when it closes).
func connect(src netip.Addr, dst netip.AddrPort, timeout time.Duration) (int, netip.AddrPort, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, netip.AddrPort{}, err
	}
	if timeout < time.Millisecond {
		timeout = time.Millisecond
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	err = errors.Join(unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv))
	if err == nil && src.IsValid() {
		err = unix.Bind(fd, &unix.SockaddrInet4{Addr: src.As4()})
	}
	if err == nil {
		err = sockio.ConnectOnce(fd, &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}, time.Now().Add(timeout))
	}
	var local netip.AddrPort
	if err == nil {
		var sa unix.Sockaddr
		if sa, err = unix.Getsockname(fd); err == nil {
			in := sa.(*unix.SockaddrInet4)
			local = netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port))
		}
	}
	if err != nil {
		unix.Close(fd)
		return -1, netip.AddrPort{}, err
	}
	return fd, local, nil
}

func unwrap(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		err = oe.Err
	}
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	return err
}

// Summary joins checks into one line each, for printing.
func Summary(checks []Check) string {
	var b strings.Builder
	for _, c := range checks {
		b.WriteString(c.String() + "\n")
	}
	return b.String()
}
