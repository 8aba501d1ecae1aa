package testpod

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/internal/sockio"
	"golang.org/x/sys/unix"
)

// DNS test helpers. A UDP server answers every datagram with its name; a query client
// sends one datagram (or makes one TCP connection) the way a resolver does and reports who
// answered and the addresses the kernel showed it: the reply's source (recvfrom) and the
// socket's peer (getpeername). That is what DNS capture must get right: glibc, dig and Go
// drop an answer whose source is not the nameserver they asked.

// QueryKind is how a Query reaches its destination.
type QueryKind string

const (
	// UDPUnconnected: sendto and recvfrom on an unconnected socket (dig, musl).
	UDPUnconnected QueryKind = "udp"
	// UDPConnected: connect, send, recvfrom, getpeername (glibc, Go).
	UDPConnected QueryKind = "udp-connected"
	// TCPQuery: connect, getpeername, read the server's Hop line (large answers).
	TCPQuery QueryKind = "tcp"
)

// Query is one DNS-like exchange.
type Query struct {
	Kind QueryKind
	Dst  netip.AddrPort // IPv6 Dsts are asked from an AF_INET6 socket
	// V4Mapped sends from a dual-stack AF_INET6 socket to ::ffff:<Dst> (an IPv4 Dst).
	V4Mapped bool
	// Then, if valid, is asked next from the same socket (sendto it, or connect it there
	// anew), and the result is that second exchange's.
	Then netip.AddrPort
}

func (q Query) String() string {
	s := string(q.Kind) + ":" + q.Dst.String()
	if q.Then.IsValid() {
		s += "," + q.Then.String()
	}
	if q.V4Mapped {
		s = v4MappedPrefix + s
	}
	return s
}

// QueryResult is what the client saw. Addresses are printed unmapped (::ffff:a.b.c.d as
// a.b.c.d), as a resolver compares them.
type QueryResult struct {
	Who  string `json:"who,omitempty"`  // the answering server's name
	From string `json:"from,omitempty"` // UDP: the reply's source address
	Peer string `json:"peer,omitempty"` // connected sockets: getpeername()
	Err  string `json:"err,omitempty"`
}

// UDPServer starts a udp-server helper in the pod as uid/gid, bound to listen.
func (p *Pod) UDPServer(tb testing.TB, name string, listen netip.AddrPort, uid, gid uint32) *Proc {
	tb.Helper()
	return p.Start(tb, ProcSpec{UID: uid, GID: gid, Args: []string{"udp-server", name, listen.String()}}).WaitReady(tb)
}

// UDPServer starts a udp-server helper in the remote netns, bound to listen (so its
// replies come from that address).
func (n *Network) UDPServer(tb testing.TB, name string, listen netip.AddrPort) *Proc {
	tb.Helper()
	return n.Start(tb, ProcSpec{Args: []string{"udp-server", name, listen.String()}}).WaitReady(tb)
}

// Query runs one query in the pod as uid/gid.
func (p *Pod) Query(tb testing.TB, uid, gid uint32, q Query) QueryResult {
	tb.Helper()
	out := p.Start(tb, ProcSpec{UID: uid, GID: gid, Args: []string{"query", q.String()}}).Wait(tb, ClientTimeout+readyTimeout)
	var r QueryResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		tb.Fatalf("testpod: query %s printed %q: %v", q, out, err)
	}
	return r
}

// GoResolve runs Go's pure resolver in the pod as uid/gid for name, asking nameserver (what
// resolv.conf would name) over UDP, or TCP with tcp, and returns its answer or error text.
func (p *Pod) GoResolve(tb testing.TB, uid, gid uint32, name string, nameserver netip.AddrPort, tcp bool) string {
	tb.Helper()
	args := []string{"resolve", name, nameserver.String()}
	if tcp {
		args = append(args, "tcp")
	}
	return strings.TrimSpace(p.Start(tb, ProcSpec{UID: uid, GID: gid, Args: args}).Wait(tb, ClientTimeout+readyTimeout))
}

// resolve NAME NS:PORT [tcp]: Go's pure resolver (message IDs, the question checked, a
// connected socket per query), with the nameserver given instead of read from resolv.conf.
func runResolve(args []string) error {
	if len(args) < 2 {
		return errors.New("usage: resolve NAME NS:PORT [tcp]")
	}
	ns, err := netip.ParseAddrPort(args[1])
	if err != nil {
		return err
	}
	network := "udp4"
	if len(args) > 2 && args[2] == "tcp" {
		network = "tcp4"
	}
	if !ns.Addr().Is4() {
		network = network[:3] + "6"
	}
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, args[1])
	}}
	ctx, cancel := context.WithTimeout(context.Background(), ClientTimeout)
	defer cancel()
	addrs, err := r.LookupHost(ctx, args[0])
	if err != nil {
		fmt.Println("error: " + err.Error())
		return nil
	}
	fmt.Println(strings.Join(addrs, " "))
	return nil
}

// udp-server NAME ADDR:PORT: answer every datagram with NAME.
func runUDPServer(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: udp-server NAME ADDR:PORT")
	}
	ap, err := netip.ParseAddrPort(args[1])
	if err != nil {
		return err
	}
	pc, err := net.ListenPacket(udpNetwork(ap.Addr()), args[1])
	if err != nil {
		return err
	}
	Ready()
	buf := make([]byte, 512)
	for {
		_, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		if _, err := pc.WriteTo([]byte(args[0]), from); err != nil {
			return err
		}
	}
}

// query [v4mapped:]KIND:ADDR:PORT: print one QueryResult.
func runQuery(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: query [v4mapped:]KIND:ADDR:PORT")
	}
	spec, mapped := strings.CutPrefix(args[0], v4MappedPrefix)
	kind, dsts, _ := strings.Cut(spec, ":")
	var aps []netip.AddrPort
	for _, d := range strings.Split(dsts, ",") {
		ap, err := netip.ParseAddrPort(d)
		if err != nil {
			return err
		}
		aps = append(aps, ap)
	}
	r := query(QueryKind(kind), aps, mapped)
	return json.NewEncoder(os.Stdout).Encode(r)
}

func query(kind QueryKind, dsts []netip.AddrPort, v4mapped bool) (r QueryResult) {
	fail := func(err error) QueryResult {
		r.Err = errText(err)
		return r
	}
	family, typ := unix.AF_INET, unix.SOCK_DGRAM
	for _, d := range dsts {
		if v4mapped || d.Addr().Is6() {
			family = unix.AF_INET6
		}
	}
	if kind == TCPQuery {
		typ = unix.SOCK_STREAM
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail(err)
	}
	defer unix.Close(fd)
	if v4mapped {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return fail(err)
		}
	}
	tv := unix.NsecToTimeval(ClientTimeout.Nanoseconds())
	for _, opt := range []int{unix.SO_SNDTIMEO, unix.SO_RCVTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			return fail(err)
		}
	}
	for i, dst := range dsts {
		if r = exchange(fd, kind, dst, family == unix.AF_INET6); r.Err != "" && i < len(dsts)-1 {
			r.Err = "first query: " + r.Err
			return r
		}
	}
	return r
}

// exchange asks dst once on fd, an AF_INET6 socket if inet6 (IPv4 dsts then as ::ffff:a).
func exchange(fd int, kind QueryKind, dst netip.AddrPort, inet6 bool) (r QueryResult) {
	fail := func(err error) QueryResult {
		r.Err = errText(err)
		return r
	}
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: dst.Addr().As16(), Port: int(dst.Port())}
	if !inet6 {
		sa = &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}
	}
	if kind != UDPUnconnected {
		// sockio.ConnectOnce: a signal must not turn the handshake into "interrupted system call"
		// (issue 23), nor issue a second connect the hooks would count.
		if err := sockio.ConnectOnce(fd, sa, time.Now().Add(ClientTimeout)); err != nil {
			return fail(err)
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			return fail(err)
		}
		r.Peer = sockaddrString(peer)
	}
	if kind == TCPQuery {
		buf := make([]byte, 4096)
		var n int
		err := sockio.RetryEINTR(func() (err error) { n, err = unix.Read(fd, buf); return err })
		if err != nil {
			return fail(err)
		}
		var h Hop
		if err := json.Unmarshal([]byte(strings.SplitN(string(buf[:n]), "\n", 2)[0]), &h); err != nil {
			r.Err = fmt.Sprintf("garbled answer %q", buf[:n])
			return r
		}
		r.Who = h.Who
		return r
	}
	// With SO_RCVTIMEO/SO_SNDTIMEO set, a signal interrupts these with EINTR (they are
	// never restarted); nothing was sent or received then, so asking again is the same query.
	err := sockio.RetryEINTR(func() error {
		if kind == UDPUnconnected {
			return unix.Sendto(fd, []byte("q"), 0, sa)
		}
		_, err := unix.Write(fd, []byte("q"))
		return err
	})
	if err != nil {
		return fail(err)
	}
	buf := make([]byte, 512)
	var n int
	var from unix.Sockaddr
	err = sockio.RetryEINTR(func() (err error) { n, from, err = unix.Recvfrom(fd, buf, 0); return err })
	if err != nil {
		if errors.Is(err, unix.EAGAIN) {
			return fail(os.ErrDeadlineExceeded)
		}
		return fail(err)
	}
	r.Who, r.From = string(buf[:n]), sockaddrString(from)
	return r
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port)).String()
	}
	return fmt.Sprintf("%v", sa)
}
