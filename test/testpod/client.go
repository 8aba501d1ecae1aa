package testpod

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The client helper: one connect per target, from the kind of socket each target asks for.

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
	var thenGID int
	if rest, ok := strings.CutPrefix(target, setgidPrefix); ok {
		gid, after, _ := strings.Cut(rest, ":")
		thenGID, _ = strconv.Atoi(gid)
		target = after
	}
	shape, target := cutShape(target)
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
	if thenGID != 0 {
		// After socket(), before connect(): Setresgid changes every thread's ids.
		d.Control = func(string, string, syscall.RawConn) error {
			return syscall.Setresgid(thenGID, thenGID, thenGID)
		}
	}
	var c net.Conn
	var err error
	if shape.special() {
		c, err = dialSocket(dst, src, timeout, shape)
	} else if ap, perr := netip.ParseAddrPort(dst); perr != nil {
		err = perr
	} else {
		c, err = d.Dial(tcpNetwork(ap.Addr()), dst)
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
// default might use (see Shape): a dual-stack AF_INET6 socket (IPV6_V6ONLY off) connecting
// to an IPv6 dst natively and to an IPv4 one as ::ffff:<dst> (bound to ::ffff:<src>), as
// Java does; an IPPROTO_MPTCP socket; a socket bound to a device; TCP Fast Open; io_uring.
// Go's dialer cannot make these (it dials IPv4 addresses from AF_INET sockets, refuses
// v4-mapped ones for "tcp6", sets IPV6_V6ONLY on its IPv6 sockets, and retries MPTCP with
// plain TCP after any failure, which would make two connects out of one). setup, if any,
// runs on the socket before it is bound.
func dialSocket(dst string, src netip.Addr, timeout time.Duration, shape Shape, setup ...func(fd int) error) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(dst)
	if err != nil {
		return nil, err
	}
	dualStack := shape.V4Mapped || shape.DualStack
	family, proto := unix.AF_INET, unix.IPPROTO_TCP
	if dualStack || ap.Addr().Is6() {
		family = unix.AF_INET6
	}
	if shape.MPTCP {
		proto = unix.IPPROTO_MPTCP
	}
	if shape.IDs != nil {
		if err := become(shape.IDs.Socket); err != nil {
			return nil, fmt.Errorf("ids for socket(): %w", err)
		}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, err
	}
	if shape.IDs != nil {
		if err := become(shape.IDs.Connect); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("ids for connect(): %w", err)
		}
	}
	f := os.NewFile(uintptr(fd), "client")
	defer f.Close() // net.FileConn dups it
	sockaddr := func(a netip.Addr, port uint16) unix.Sockaddr {
		if family == unix.AF_INET6 {
			return &unix.SockaddrInet6{Addr: a.As16(), Port: int(port)} // IPv4 as ::ffff:a
		}
		return &unix.SockaddrInet4{Addr: a.As4(), Port: int(port)}
	}
	if dualStack {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return nil, err
		}
	}
	if err := bindDevice(fd, shape); err != nil {
		return nil, err
	}
	for _, set := range setup {
		if err := set(fd); err != nil {
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
	if err := connectShaped(fd, sockaddr(ap.Addr(), ap.Port()), shape, deadline); err != nil {
		return nil, err
	}
	return net.FileConn(f)
}
