package bench

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/sockio"
	"github.com/meshdivert/divert/test/testpod"
)

// B7's helper processes (see helpers.go for how they start).
//
//	bench-dns    a DNS responder: the agent stand-in on 127.0.0.1:15053 (as the proxy uid)
//	             and, outside the pod, the nameserver the app asks (which must never answer)
//	bench-dnsq   the application's resolver: one query per socket, as glibc and Go ask
//
// A query is dnsMsgSize bytes, the size of a typical A question: a 2-byte id, then a byte
// the responder sets to its marker, then padding. The answer is the query with the marker
// set; over TCP both carry DNS's 2-byte length prefix. No DNS parsing: what is measured is
// the capture path, and the responder is the same cheap loop in every mode.
const (
	cmdDNS      = "bench-dns"
	cmdDNSQuery = "bench-dnsq"

	dnsMsgSize   = 40
	markerAgent  = 'A'
	markerServer = 'N'
	dnsTimeout   = 2 * time.Second // a lost UDP answer fails the run instead of hanging it
)

// dnsArgs is the command line of a bench-dns answering on listen with marker.
func dnsArgs(listen netip.AddrPort, marker byte) []string {
	return []string{cmdDNS, "--listen", listen.String(), "--marker", string(rune(marker))}
}

// runDNS answers UDP and TCP queries on --listen with --marker.
func runDNS(args []string) error {
	fs := flag.NewFlagSet(cmdDNS, flag.ContinueOnError)
	addr := fs.String("listen", "127.0.0.1:15053", "ip:port, UDP and TCP")
	marker := fs.String("marker", "A", "one byte written into every answer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(*addr)
	if err != nil || !ap.Addr().Is4() || len(*marker) != 1 {
		return fmt.Errorf("--listen must be an IPv4 ip:port and --marker one byte")
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		return fmt.Errorf("bind udp %s: %w", ap, err)
	}
	ln, err := testpod.Listen(*addr)
	if err != nil {
		return err
	}
	m := (*marker)[0]
	errc := make(chan error, 3)
	// Two threads in blocking recvfrom on one socket: the parallel clients are not
	// serialised behind one reader, and no poller sits between the kernel and the answer.
	for range 2 {
		go func() { errc <- serveUDP(fd, m) }()
	}
	go func() { errc <- testpod.Accept(ln, func(c *net.TCPConn) { serveDNSConn(c, m) }) }()
	testpod.Ready()
	return <-errc
}

func serveUDP(fd int, marker byte) error {
	runtime.LockOSThread()
	buf := make([]byte, 512)
	for {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("recvfrom: %w", err)
		}
		if n >= 3 {
			buf[2] = marker
		}
		if err := sockio.RetryEINTR(func() error { return unix.Sendto(fd, buf[:n], 0, from) }); err != nil {
			return fmt.Errorf("sendto %v: %w", from, err)
		}
	}
}

// serveDNSConn answers length-prefixed queries until the client goes away.
func serveDNSConn(c net.Conn, marker byte) {
	defer c.Close()
	buf := make([]byte, 2+512)
	for {
		if _, err := io.ReadFull(c, buf[:2]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint16(buf))
		if n > 512 {
			return
		}
		if _, err := io.ReadFull(c, buf[2:2+n]); err != nil {
			return
		}
		if n >= 3 {
			buf[2+2] = marker
		}
		if _, err := c.Write(buf[:2+n]); err != nil {
			return
		}
	}
}

// runDNSQuery is the app: --n queries after --warmup ones, each on its own socket (connect,
// send, receive, close, as glibc's and Go's resolvers do), timed one by one; or, with
// --clients, that many resolvers asking back to back for --duration. Every answer must come
// from the stand-in (its marker) with the source (UDP) and peer --want (what the app asked,
// or 127.0.0.1:15053 when it asks the stand-in itself). It prints a LoadResult, Conns
// being the queries asked, warm-up included.
func runDNSQuery(args []string) error {
	fs := flag.NewFlagSet(cmdDNSQuery, flag.ContinueOnError)
	proto := fs.String("proto", "udp", "udp | tcp")
	dstText := fs.String("dst", "", "ip:port the app asks")
	n := fs.Int("n", 1000, "measured queries (sequential)")
	warmup := fs.Int("warmup", 100, "discarded queries first")
	clients := fs.Int("clients", 0, "parallel resolvers for --duration instead of --n sequential queries")
	duration := fs.Duration("duration", time.Second, "measured time (parallel)")
	if err := parseWithCgroups(fs, args); err != nil {
		return err
	}
	dst, err := netip.ParseAddrPort(*dstText)
	if err != nil || !dst.Addr().Is4() {
		return fmt.Errorf("--dst must be an IPv4 ip:port")
	}
	if *proto != "udp" && *proto != "tcp" {
		return fmt.Errorf("--proto must be udp or tcp, not %q", *proto)
	}
	q := &querier{tcp: *proto == "tcp", sa: &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}}
	ask := func(i int) (bool, error) { return q.ask(uint16(i), i == 0) }
	var res LoadResult
	if *clients > 0 {
		// Each resolver checks its first answer's peer among its warm-up queries.
		res = parallel(*clients, *warmup, 0, *duration, func() func(int) (bool, error) { return ask })
	} else {
		res = sequential(*warmup, *n, false, ask)
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

type querier struct {
	tcp bool
	sa  *unix.SockaddrInet4
}

// ask makes one query on a new socket and reports whether the answer took the wrong path:
// another responder, or a source or peer other than what the app asked (a resolver drops
// such an answer). checkPeer adds getpeername, which resolvers do not all call.
func (q *querier) ask(id uint16, checkPeer bool) (bool, error) {
	typ := unix.SOCK_DGRAM
	if q.tcp {
		typ = unix.SOCK_STREAM
	}
	fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("socket: %w", err)
	}
	var msg [2 + 512]byte
	binary.BigEndian.PutUint16(msg[:], dnsMsgSize)
	query := msg[2 : 2+dnsMsgSize]
	binary.BigEndian.PutUint16(query, id)
	wrong := false
	if q.tcp {
		defer closeReset(fd) // no TIME_WAIT left behind by thousands of queries
		// Blocking, no timeout: the kernel restarts it after a signal (see dial).
		if err := unix.Connect(fd, q.sa); err != nil {
			return false, fmt.Errorf("connect: %w", err)
		}
		if err := writeAll(fd, msg[:2+dnsMsgSize]); err != nil {
			return false, err
		}
		if err := readFull(fd, msg[:2+dnsMsgSize]); err != nil {
			return false, err
		}
		wrong = binary.BigEndian.Uint16(msg[:]) != dnsMsgSize
	} else {
		defer unix.Close(fd)
		tv := unix.NsecToTimeval(dnsTimeout.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return false, err
		}
		if err := unix.Connect(fd, q.sa); err != nil { // UDP: no handshake, never interrupted
			return false, fmt.Errorf("connect: %w", err)
		}
		if err := sockio.RetryEINTR(func() error { _, err := unix.Write(fd, query); return err }); err != nil {
			return false, fmt.Errorf("send: %w", err)
		}
		var n int
		var from unix.Sockaddr
		err := sockio.RetryEINTR(func() (err error) { n, from, err = unix.Recvfrom(fd, msg[2:], 0); return err })
		if err != nil {
			return false, fmt.Errorf("recv: %w", err)
		}
		wrong = n != dnsMsgSize || !q.is(from)
	}
	if checkPeer {
		peer, err := unix.Getpeername(fd)
		if err != nil {
			return false, fmt.Errorf("getpeername: %w", err)
		}
		wrong = wrong || !q.is(peer)
	}
	return wrong || binary.BigEndian.Uint16(query) != id || query[2] != markerAgent, nil
}

func (q *querier) is(sa unix.Sockaddr) bool {
	a, ok := sa.(*unix.SockaddrInet4)
	return ok && a.Addr == q.sa.Addr && a.Port == q.sa.Port
}
