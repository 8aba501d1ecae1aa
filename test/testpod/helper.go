package testpod

import (
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
)

// server: on each connection write one Hop line, then close.
func runServer(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	name := fs.String("name", "server", "who to report")
	addr := fs.String("listen", "", "ip:port")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return Serve(*addr, func(c *net.TCPConn) {
		defer c.Close()
		writeHop(c, Hop{Who: *name, Local: c.LocalAddr().String(), Peer: c.RemoteAddr().String()})
	})
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// proxy: report the original destination; in forward mode also relay to it.
func runProxy(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	name := fs.String("name", "proxy", "who to report")
	mode := fs.String("mode", "report", "report | forward")
	var inboundSrc listFlag
	fs.Var(&inboundSrc, "inbound-src", "source to bind when forwarding inbound (e.g. 127.0.0.6, ::6; repeatable, one per family)")
	inboundPort := fs.Int("inbound-port", 15006, "listener port whose connections are inbound")
	reuseport := fs.Int("reuseport", 0, "listen this many times on each address with SO_REUSEPORT")
	transparent := fs.Bool("transparent", false, "set IP_TRANSPARENT on the listeners (TPROXY)")
	v6only := fs.Bool("v6only", false, "make [::] listeners IPv6-only (IPV6_V6ONLY)")
	osrcMark := fs.Uint("original-src-mark", 0, "forward inbound from the client's address with this SO_MARK (Envoy's original_src; 0: off)")
	// Under istio's rules that dial never completes (docs/semantics.md): it must give up
	// well before the client stops waiting for our line.
	originalSrcTimeout := fs.Duration("original-src-timeout", ClientTimeout/2, "how long an original-src dial may take")
	originalSrcDual := fs.Bool("original-src-dual-stack", false, "make original-src dials from a dual-stack AF_INET6 socket (::ffff:a.b.c.d)")
	var addrs listFlag
	fs.Var(&addrs, "listen", "ip:port (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *mode != "report" && *mode != "forward" {
		return fmt.Errorf("bad --mode %q", *mode)
	}
	var srcs []netip.Addr
	for _, a := range inboundSrc {
		src, err := netip.ParseAddr(a)
		if err != nil {
			return err
		}
		srcs = append(srcs, src)
	}
	var lns []net.Listener
	var index []int // which of the SO_REUSEPORT sockets of its address each listener is
	for _, a := range addrs {
		for i := range max(*reuseport, 1) {
			ln, err := listenWith(a, *reuseport > 0, *transparent, *v6only)
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
	Ready()
	errc := make(chan error)
	for i, ln := range lns {
		// Inbound is decided by the listener, not by the accepted socket's local address:
		// with sk_lookup steering, getsockname() shows the original destination, not 15006.
		var bind []netip.Addr
		var mark uint32
		if ln.Addr().(*net.TCPAddr).Port == *inboundPort {
			bind, mark = srcs, uint32(*osrcMark)
		}
		osrc := originalSrc{mark, *originalSrcTimeout, *originalSrcDual}
		go func() {
			errc <- Accept(ln, func(c *net.TCPConn) {
				proxyConn(c, *name, *mode == "forward", bind, osrc, ln.Addr().String(), index[i])
			})
		}()
	}
	return <-errc
}

// proxyConn reports (and in forward mode relays) one accepted connection. When forwarding,
// it binds the one of bindSrcs in the original destination's family, as Envoy binds
// 127.0.0.6 or ::6 for inbound passthrough; or, with a mark, the client's own address, as
// Envoy's original_src does in TPROXY mode (originalSrcDialer).
func proxyConn(c *net.TCPConn, name string, forward bool, bindSrcs []netip.Addr, osrc originalSrc, listener string, index int) {
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
		var bindSrc netip.Addr
		for _, a := range bindSrcs {
			if a.Is4() == orig.Addr().Is4() {
				bindSrc = a
			}
		}
		d := Dialer(3*time.Second, bindSrc)
		client := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		if osrc.mark != 0 {
			d = originalSrcDialer(osrc.timeout, client, osrc.mark)
		}
		if osrc.mark != 0 && osrc.dual {
			up, err = dialSocket(hop.Orig, client, osrc.timeout, Shape{V4Mapped: true}, func(fd int) error {
				return errors.Join(unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1),
					unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(osrc.mark)))
			})
		} else {
			up, err = d.Dial(TCPNetwork(orig.Addr()), hop.Orig)
		}
		if err != nil {
			hop.Err = errText(err)
		} else {
			hop.UpstreamSrc = up.LocalAddr().String()
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

// originalSrc is how a proxy forwards inbound connections from the client's address: with
// this mark (0: it does not), giving up after timeout.
type originalSrc struct {
	mark    uint32
	timeout time.Duration
	dual    bool // from a dual-stack AF_INET6 socket, IPv4 as ::ffff:a.b.c.d
}

// originalSrcDialer dials from client's address as Envoy's original_src does: IP_TRANSPARENT
// to bind an address that is not the pod's (needs CAP_NET_ADMIN), SO_MARK so that policy
// routing brings the app's replies back to this socket over lo, and any source port: the
// client's own would give this connection the 4-tuple of the client's connection to the
// pod, which the proxy's accepted socket already holds in the same namespace.
func originalSrcDialer(timeout time.Duration, client netip.Addr, mark uint32) *net.Dialer {
	d := Dialer(timeout, client.Unmap())
	d.Control = func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if client.Unmap().Is4() {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			}
			if serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
			}
		})
		return errors.Join(err, serr)
	}
	return d
}

func writeHop(w io.Writer, h Hop) bool {
	b, _ := json.Marshal(h)
	_, err := w.Write(append(b, '\n'))
	return err == nil
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
	ap, err := netip.ParseAddrPort(args[0])
	if err != nil {
		return err
	}
	c, err := net.Dial(udpNetwork(ap.Addr()), args[0])
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
