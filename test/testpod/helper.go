package testpod

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/origdst"
	"github.com/meshdivert/divert/internal/sockio"
)

const (
	helperEnv = "DIVERT_TESTPOD_HELPER"
	readyLine = "ready"
)

// RunHelperIfRequested turns the test binary into a helper process when testpod started it
// that way; otherwise it returns at once. Call it first thing in TestMain:
//
//	func TestMain(m *testing.M) {
//		testpod.RunHelperIfRequested()
//		os.Exit(m.Run())
//	}
func RunHelperIfRequested() {
	if os.Getenv(helperEnv) != "1" {
		return
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "testpod helper: no command")
		os.Exit(2)
	}
	cmds := map[string]func([]string) error{
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
	run, ok := cmds[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "testpod helper: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	if err := run(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "testpod helper %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	os.Exit(0)
}

// listen opens a plain TCP listener. Go >= 1.24 makes listeners MPTCP by default, and
// SOCKMAP (used by the eBPF inbound path) refuses MPTCP sockets.
func listen(addr string) (net.Listener, error) { return listenWith(addr, false, false) }

// listenWith optionally sets SO_REUSEPORT, as Envoy does with one listener per worker, and
// IP_TRANSPARENT, which iptables TPROXY needs on the listener it delivers to.
func listenWith(addr string, reuseport, transparent bool) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	lc.Control = func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if reuseport {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}
			if transparent && serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			}
		})
		return errors.Join(err, serr)
	}
	return lc.Listen(context.Background(), "tcp4", addr)
}

// dialer returns a plain-TCP dialer (never MPTCP, so cgroup hooks see ordinary TCP).
func dialer(timeout time.Duration, src netip.Addr) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	d.SetMultipathTCP(false)
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	return d
}

// server: on each connection write one Hop line, then close.
func runServer(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	name := fs.String("name", "server", "who to report")
	addr := fs.String("listen", "", "ip:port")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := listen(*addr)
	if err != nil {
		return err
	}
	fmt.Println(readyLine)
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			writeHop(c, Hop{Who: *name, Local: c.LocalAddr().String(), Peer: c.RemoteAddr().String()})
		}()
	}
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// proxy: report the original destination; in forward mode also relay to it.
func runProxy(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	name := fs.String("name", "proxy", "who to report")
	mode := fs.String("mode", "report", "report | forward")
	inboundSrc := fs.String("inbound-src", "", "source to bind when forwarding inbound (e.g. 127.0.0.6)")
	inboundPort := fs.Int("inbound-port", 15006, "listener port whose connections are inbound")
	reuseport := fs.Int("reuseport", 0, "listen this many times on each address with SO_REUSEPORT")
	transparent := fs.Bool("transparent", false, "set IP_TRANSPARENT on the listeners (TPROXY)")
	var addrs listFlag
	fs.Var(&addrs, "listen", "ip:port (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *mode != "report" && *mode != "forward" {
		return fmt.Errorf("bad --mode %q", *mode)
	}
	var src netip.Addr
	if *inboundSrc != "" {
		var err error
		if src, err = netip.ParseAddr(*inboundSrc); err != nil {
			return err
		}
	}
	var lns []net.Listener
	var index []int // which of the SO_REUSEPORT sockets of its address each listener is
	for _, a := range addrs {
		for i := range max(*reuseport, 1) {
			ln, err := listenWith(a, *reuseport > 0, *transparent)
			if err != nil {
				return err
			}
			lns = append(lns, ln)
			index = append(index, i)
		}
	}
	if len(lns) == 0 {
		return errors.New("no --listen")
	}
	fmt.Println(readyLine)
	errc := make(chan error)
	for i, ln := range lns {
		// Inbound is decided by the listener, not by the accepted socket's local address:
		// with sk_lookup steering, getsockname() shows the original destination, not 15006.
		var bind netip.Addr
		if ln.Addr().(*net.TCPAddr).Port == *inboundPort {
			bind = src
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					errc <- err
					return
				}
				go proxyConn(c.(*net.TCPConn), *name, *mode == "forward", bind, ln.Addr().String(), index[i])
			}
		}()
	}
	return <-errc
}

func proxyConn(c *net.TCPConn, name string, forward bool, bindSrc netip.Addr, listener string, index int) {
	defer c.Close()
	hop := Hop{Who: name, Listener: listener, Index: index, Local: c.LocalAddr().String(), Peer: c.RemoteAddr().String()}
	orig, err := origdst.Get(c)
	if err != nil {
		hop.OrigErr = errText(err)
	} else {
		hop.Orig = orig.String()
	}
	var up net.Conn
	if forward && err == nil {
		// The proxy must run as the excluded uid (1337), or its own dial is redirected back
		// to itself.
		if up, err = dialer(3*time.Second, bindSrc).Dial("tcp4", hop.Orig); err != nil {
			hop.Err = errText(err)
		}
	}
	// Our line goes first, so the client sees the hops in path order.
	if !writeHop(c, hop) || up == nil {
		return
	}
	defer up.Close()
	go func() { _, _ = io.Copy(up, c) }() // ends when c is closed below
	_, _ = io.Copy(c, up)
}

func writeHop(w io.Writer, h Hop) bool {
	b, _ := json.Marshal(h)
	_, err := w.Write(append(b, '\n'))
	return err == nil
}

// client: connect to each target in turn and print one Result line per target.
func runClient(args []string) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 3*time.Second, "per target: connect + read to EOF")
	repeatFor := fs.Duration("for", 0, "dial the targets again and again until this much time has passed (0: once)")
	interval := fs.Duration("interval", 50*time.Millisecond, "with --for: pause between rounds")
	var targets listFlag
	fs.Var(&targets, "target", "DST[@BINDSRC] (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	end := time.Now().Add(*repeatFor)
	for {
		for _, t := range targets {
			if err := enc.Encode(clientDial(t, *timeout)); err != nil {
				return err
			}
		}
		if time.Now().After(end) {
			return nil
		}
		time.Sleep(*interval)
	}
}

func clientDial(target string, timeout time.Duration) Result {
	res := Result{Dst: target}
	target, mptcp := strings.CutPrefix(target, mptcpPrefix)
	target, mapped := strings.CutPrefix(target, v4MappedPrefix)
	dst, srcText, _ := strings.Cut(target, "@")
	res.Dst = dst
	var src netip.Addr
	if srcText != "" {
		var err error
		if src, err = netip.ParseAddr(srcText); err != nil {
			res.Err = err.Error()
			return res
		}
	}
	d := dialer(timeout, src)
	d.Deadline = time.Now().Add(timeout)
	var c net.Conn
	var err error
	if mapped || mptcp {
		c, err = dialSocket(dst, src, timeout, mapped, mptcp)
	} else {
		c, err = d.Dial("tcp4", dst)
	}
	if err != nil {
		res.Err = errText(err)
		return res
	}
	defer c.Close()
	_ = c.SetDeadline(d.Deadline)
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		var h Hop
		if err := json.Unmarshal(sc.Bytes(), &h); err != nil {
			res.Err = fmt.Sprintf("garbled line %q", sc.Text())
			return res
		}
		res.Hops = append(res.Hops, h)
	}
	if err := sc.Err(); err != nil {
		res.Err = errText(err)
	}
	return res
}

// dialSocket connects with one connect() from the kind of socket a runtime other than Go's
// default might use: v4mapped, a dual-stack AF_INET6 socket to ::ffff:<dst> (bound to
// ::ffff:<src>), as Java does; mptcp, an IPPROTO_MPTCP socket. Go's dialer cannot make the
// first (it dials IPv4 addresses from AF_INET sockets and refuses v4-mapped ones for
// "tcp6") and, for the second, retries with plain TCP after any failure, which would make
// two connects out of one.
func dialSocket(dst string, src netip.Addr, timeout time.Duration, v4mapped, mptcp bool) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(dst)
	if err != nil {
		return nil, err
	}
	family, proto := unix.AF_INET, unix.IPPROTO_TCP
	if v4mapped {
		family = unix.AF_INET6
	}
	if mptcp {
		proto = unix.IPPROTO_MPTCP
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "client")
	defer f.Close() // net.FileConn dups it
	sockaddr := func(a netip.Addr, port uint16) unix.Sockaddr {
		if v4mapped {
			return &unix.SockaddrInet6{Addr: netip.AddrFrom16(a.As16()).As16(), Port: int(port)}
		}
		return &unix.SockaddrInet4{Addr: a.As4(), Port: int(port)}
	}
	if v4mapped {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return nil, err
		}
	}
	deadline := time.Now().Add(timeout)
	// A blocking connect gives up after SO_SNDTIMEO (EINPROGRESS).
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		return nil, err
	}
	if src.IsValid() {
		if err := unix.Bind(fd, sockaddr(src, 0)); err != nil {
			return nil, err
		}
	}
	if err := sockio.ConnectOnce(fd, sockaddr(ap.Addr(), ap.Port()), deadline); err != nil {
		return nil, err
	}
	return net.FileConn(f)
}

// errText maps errors to short stable strings: "timeout", or the errno text such as
// "connection refused", "no such file or directory", "protocol not available".
func errText(err error) string {
	var ne net.Error
	if errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return "timeout"
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	return err.Error()
}

// id: print the process's uid, gid, groups, cgroup v2 path and netns inode.
func runID([]string) error {
	id := Identity{UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}
	id.Groups, _ = os.Getgroups()
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(cg), "\n") {
		if path, ok := strings.CutPrefix(line, "0::"); ok { // the v2 entry
			id.Cgroup = path
		}
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		return err
	}
	id.NetNS = st.Ino
	return json.NewEncoder(os.Stdout).Encode(id)
}

// UDPPayload is the datagram the udp helper sends.
const UDPPayload = "testpod udp"

// runUDP connects a UDP socket to its argument, sends one datagram (UDPPayload) and prints
// the peer the kernel ended up with: a connect hook that rewrote the destination would show
// here, and the datagram goes through the pod's netfilter rules as any first packet does.
func runUDP(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: udp ADDR:PORT")
	}
	c, err := net.Dial("udp4", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write([]byte(UDPPayload)); err != nil {
		return err
	}
	fmt.Println(c.RemoteAddr())
	return nil
}
