package testpod

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/internal/origdst"
	"github.com/meshdivert/divert/internal/sockio"
)

// A burst: an app opens many connections at once while its proxy is slow to accept, so
// they all wait, established, in the proxy's accept queue; then the proxy accepts them
// and reads each one's original destination. Whatever holds the original destinations
// must hold all of them at once.

// BurstTargets are the n distinct destinations of a burst: the network's addresses, each
// on ports from 1000 up.
func (n *Network) BurstTargets(count int) []netip.AddrPort {
	out := make([]netip.AddrPort, count)
	for i := range out {
		out[i] = netip.AddrPortFrom(n.Addrs[i%len(n.Addrs)], uint16(1000+i/len(n.Addrs)))
	}
	return out
}

// BurstConn is one connection of a burst: where the app dialled and from where, and what
// the proxy saw of it (matched by the proxy's peer address, the app's local address).
type BurstConn struct {
	Target netip.AddrPort
	Local  string // the app socket's local address once established; "" if it failed
	Err    string // the app's connect failed
	// The proxy's view, for the accepted connection whose peer is Local.
	Orig, OrigErr string
}

// BurstResult is the outcome of Pod.Burst.
type BurstResult struct {
	Conns []BurstConn
	// Accepts is what the proxy accepted; Unmatched are those whose peer is no
	// established app socket's local address (e.g. a source port NAT rewrote).
	Accepts   []BurstAccept
	Unmatched []BurstAccept
	// Settle is how long the app took from its start until every connect had settled.
	Settle time.Duration
}

type burstDial struct {
	Local string `json:"local,omitempty"`
	Err   string `json:"err,omitempty"`
}

// BurstAccept is the proxy's view of one accepted connection.
type BurstAccept struct {
	Peer    string `json:"peer"`
	Orig    string `json:"orig,omitempty"`
	OrigErr string `json:"orig_err,omitempty"`
}

const burstDone = "done"

// Burst runs a proxy listening on proxyAddr (uid/gid proxyID) that does not accept until
// an app (uid/gid appID) has connected to each of count burst targets at once; then the
// proxy accepts everything and reports each connection's original destination.
func (p *Pod) Burst(tb testing.TB, proxyAddr netip.AddrPort, proxyID, appID uint32, count int) BurstResult {
	tb.Helper()
	return p.BurstWith(tb, BurstConfig{Proxy: proxyAddr, ProxyID: proxyID, AppID: appID, Count: count})
}

// BurstConfig describes a burst (Pod.BurstWith).
type BurstConfig struct {
	// Addrs are the destinations' addresses, the network's IPv4 ones (Addrs) if empty;
	// Network.BurstTargets spreads the connections over them.
	Addrs []netip.Addr
	// Proxy is where the proxy listens: [::] is a dual-stack listener.
	Proxy          netip.AddrPort
	ProxyID, AppID uint32
	Count          int
	// Backlog, if > 0, is the proxy's listen backlog (else one that holds the burst), and
	// the proxy then accepts from the start, one connection every AcceptEvery, instead of
	// waiting for the whole burst to be queued: the accept queue overflows, so handshakes
	// complete late (a dropped SYN or final ACK is retransmitted, a SYN cookie stands in
	// for a request), and the app sends one byte on each connection once connected, as a
	// client does, which is what completes a cookie's handshake whose ACK was dropped.
	Backlog     int
	AcceptEvery time.Duration
}

// BurstWith runs a burst as c says; see Burst.
func (p *Pod) BurstWith(tb testing.TB, c BurstConfig) BurstResult {
	tb.Helper()
	count, addrList := c.Count, c.Addrs
	if len(addrList) == 0 {
		addrList = p.Net.Addrs
	}
	// The accept queue must hold the whole burst (somaxconn is per network namespace).
	must(tb, nsexec.Do(p.NetNSPath, func() error {
		return os.WriteFile("/proc/sys/net/core/somaxconn", []byte("65535\n"), 0)
	}), "raise somaxconn in the pod")
	// Each side holds count sockets. The helpers inherit this process's limit and, not
	// being root, cannot raise its hard part: raise it here where we may (a VM guest's
	// init; not these machines, where root lacks CAP_SYS_RESOURCE and 20,000 is the cap).
	var lim unix.Rlimit
	must(tb, unix.Getrlimit(unix.RLIMIT_NOFILE, &lim), "read RLIMIT_NOFILE")
	if need := uint64(count + 256); lim.Max < need {
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: need, Max: need}); err != nil {
			tb.Fatalf("testpod: a burst of %d needs RLIMIT_NOFILE %d, the hard limit is %d: %v", count, need, lim.Max, err)
		}
	}
	trickle := c.Backlog > 0
	proxy := p.Start(tb, ProcSpec{UID: c.ProxyID, GID: c.ProxyID, Args: []string{
		"burst-proxy", "--listen", c.Proxy.String(), "--count", fmt.Sprint(count),
		"--backlog", fmt.Sprint(c.Backlog), "--accept-every", c.AcceptEvery.String()}}).WaitReady(tb)

	start := time.Now()
	app := p.Start(tb, ProcSpec{UID: c.AppID, GID: c.AppID, Args: []string{
		"burst-app", "--addrs", addrsArg(addrList), "--count", fmt.Sprint(count), fmt.Sprintf("--send=%v", trickle)}})
	dials := waitLines[burstDial](tb, app, count, 2*time.Minute)
	settle := time.Since(start)

	if !trickle {
		must(tb, proxy.Cmd.Process.Signal(syscall.SIGUSR1), "tell the proxy to accept")
	}
	accepts := waitLines[BurstAccept](tb, proxy, -1, 2*time.Minute)

	byPeer := make(map[string]BurstAccept, len(accepts))
	for _, a := range accepts {
		byPeer[a.Peer] = a
	}
	res := BurstResult{Accepts: accepts, Settle: settle}
	matched := make(map[string]bool)
	for i, t := range (&Network{Addrs: addrList}).BurstTargets(count) {
		c := BurstConn{Target: t, Local: dials[i].Local, Err: dials[i].Err}
		if a, ok := byPeer[c.Local]; ok && c.Local != "" {
			c.Orig, c.OrigErr = a.Orig, a.OrigErr
			matched[c.Local] = true
		}
		res.Conns = append(res.Conns, c)
	}
	for _, a := range accepts {
		if !matched[a.Peer] {
			res.Unmatched = append(res.Unmatched, a)
		}
	}
	return res
}

// waitLines waits for a helper's "done" line and decodes the JSON lines before it (want
// of them, unless want < 0).
func waitLines[T any](tb testing.TB, pr *Proc, want int, timeout time.Duration) []T {
	tb.Helper()
	out := pr.waitStdout(tb, "done", timeout, func(out string) bool { return strings.HasSuffix(out, burstDone+"\n") })
	var lines []T
	for _, l := range strings.Split(strings.TrimSpace(strings.TrimSuffix(out, burstDone+"\n")), "\n") {
		if l == "" || l == readyLine {
			continue
		}
		var v T
		must(tb, json.Unmarshal([]byte(l), &v), "decode "+l)
		lines = append(lines, v)
	}
	if want >= 0 && len(lines) != want {
		tb.Fatalf("testpod: %v reported %d lines, want %d", pr.Cmd.Args[1:], len(lines), want)
	}
	return lines
}

// burst-app: connect to every target at once (non-blocking), wait until each connect is
// settled, report one line per target, then hold the connections open until killed.
func runBurstApp(args []string) error {
	fs := flag.NewFlagSet("burst-app", flag.ContinueOnError)
	var addrs addrsFlag
	fs.Var(&addrs, "addrs", "destination addresses, comma-separated")
	count := fs.Int("count", 0, "connections")
	timeout := fs.Duration("timeout", time.Minute, "for all connects to settle")
	send := fs.Bool("send", false, "send one byte on each connection once connected")
	if err := fs.Parse(args); err != nil {
		return err
	}
	targets := (&Network{Addrs: addrs}).BurstTargets(*count)
	fds := make([]int, len(targets))
	out := make([]burstDial, len(targets))
	for i, t := range targets {
		family, sa := sockaddr(t)
		fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket %d: %w", i, err)
		}
		fds[i] = fd
		if err := sockio.RetryEINTR(func() error { return unix.Connect(fd, sa) }); err != nil && err != unix.EINPROGRESS {
			out[i].Err = errText(err)
			fds[i] = -1
			unix.Close(fd)
		}
	}
	// Wait for every pending connect to finish, one way or the other.
	deadline := time.Now().Add(*timeout)
	pending := make(map[int]int) // fd -> index
	for i, fd := range fds {
		if fd >= 0 {
			pending[fd] = i
		}
	}
	for len(pending) > 0 {
		if time.Now().After(deadline) {
			for _, i := range pending {
				out[i].Err = "timeout"
			}
			break
		}
		pfds := make([]unix.PollFd, 0, len(pending))
		for fd := range pending {
			pfds = append(pfds, unix.PollFd{Fd: int32(fd), Events: unix.POLLOUT})
		}
		if _, err := unix.Poll(pfds, 200); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("poll: %w", err)
		}
		for _, pfd := range pfds {
			if pfd.Revents == 0 {
				continue
			}
			fd := int(pfd.Fd)
			i := pending[fd]
			delete(pending, fd)
			if soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soErr != 0 {
				out[i].Err = errText(errors.Join(err, syscall.Errno(soErr)))
				continue
			}
			sa, err := unix.Getsockname(fd)
			if err != nil {
				out[i].Err = errText(err)
				continue
			}
			out[i].Local = sockaddrString(sa)
			if *send {
				if _, err := unix.Write(fd, []byte{'x'}); err != nil {
					out[i].Err = errText(err)
				}
			}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	for _, d := range out {
		if err := enc.Encode(d); err != nil {
			return err
		}
	}
	fmt.Println(burstDone)
	holdUntilKilled() // with the connections open
	return nil
}

// burst-proxy: listen with a queue deep enough for the burst, accept nothing until
// SIGUSR1, then accept everything that is queued and report each original destination.
func runBurstProxy(args []string) error {
	fs := flag.NewFlagSet("burst-proxy", flag.ContinueOnError)
	listenAddr := fs.String("listen", "", "ip:port ([::]: dual-stack)")
	count := fs.Int("count", 0, "connections to expect (the queue's depth)")
	backlog := fs.Int("backlog", 0, "listen backlog; if > 0, accept from the start instead of after SIGUSR1")
	acceptEvery := fs.Duration("accept-every", 0, "with --backlog: pause between accepts")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(*listenAddr)
	if err != nil {
		return err
	}
	go1 := make(chan os.Signal, 1)
	signal.Notify(go1, syscall.SIGUSR1)
	family, sa := sockaddr(ap)
	ln, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err := unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return err
	}
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(ln, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return err
		}
	}
	if err := unix.Bind(ln, sa); err != nil {
		return err
	}
	depth, idle := *count+64, 500*time.Millisecond
	if *backlog > 0 {
		// Late handshakes arrive on the SYN and SYN-ACK retransmission timers (1, 3, 7 s
		// ...) and the data's (the app's byte): wait out a few of them.
		depth, idle = *backlog, 20*time.Second
	}
	if err := unix.Listen(ln, depth); err != nil {
		return err
	}
	Ready()
	if *backlog == 0 {
		<-go1
	}
	if err := unix.SetNonblock(ln, true); err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	// Everything is queued already (or arrives late, with --backlog); stop once the queue
	// stays empty for a while, or everything came.
	idleSince := time.Now()
	for accepted := 0; accepted < *count && time.Since(idleSince) < idle; {
		fd, sa, err := unix.Accept4(ln, unix.SOCK_CLOEXEC)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		idleSince = time.Now()
		accepted++
		a := BurstAccept{Peer: sockaddrString(sa)}
		get := origdst.GetFD
		if in6, ok := sa.(*unix.SockaddrInet6); ok && !netip.AddrFrom16(in6.Addr).Is4In6() {
			get = origdst.GetFD6 // as Envoy asks a native IPv6 connection
		}
		if orig, err := get(fd); err != nil {
			a.OrigErr = errText(err)
		} else {
			a.Orig = orig.String()
		}
		if err := enc.Encode(a); err != nil {
			return err
		}
		// fd stays open until the process is killed: the burst is about holding them all.
		time.Sleep(*acceptEvery)
	}
	fmt.Println(burstDone)
	holdUntilKilled()
	return nil
}

// sockaddr is ap as a socket address of its own family.
func sockaddr(ap netip.AddrPort) (family int, sa unix.Sockaddr) {
	if ap.Addr().Is6() {
		return unix.AF_INET6, &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	return unix.AF_INET, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
}

// holdUntilKilled blocks until the process is killed. Not select{}: with no goroutine
// left that could run and no timer, the Go runtime calls that a deadlock and exits (seen
// in a VM guest while the proxy of a trickling burst was still accepting).
func holdUntilKilled() {
	for {
		time.Sleep(time.Hour)
	}
}
