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
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The client helper: one connect per target, from the kind of socket each target asks for;
// what a test asks (Target) and what it gets back (Result), from the test's side first.

// Target is one connection a client makes.
type Target struct {
	Dst     netip.AddrPort
	BindSrc netip.Addr // optional: bind before connect
	Shape              // how the socket connects (zero: Go's dialer)
	// ThenGID, if set, switches the client's gids to it between socket() and connect() (the
	// client must run as root): the socket file keeps the group it was made with.
	ThenGID uint32
}

// setgidPrefix marks a ThenGID target on the client's command line (before the Shape's).
const setgidPrefix = "setgid="

func (t Target) String() string {
	s := t.Dst.String()
	if t.BindSrc.IsValid() {
		s += "@" + t.BindSrc.String()
	}
	s = t.Shape.prefix() + s
	if t.ThenGID != 0 {
		s = setgidPrefix + strconv.FormatUint(uint64(t.ThenGID), 10) + ":" + s
	}
	return s
}

// Result is what a client saw for one Target.
type Result struct {
	Dst  string `json:"dst"`
	Err  string `json:"err,omitempty"` // "connection refused", "timeout", or errno text
	Hops []Hop  `json:"hops,omitempty"`
}

// Hop is the JSON line a listener writes for each connection it accepts.
type Hop struct {
	Who string `json:"who"`
	// Listener is the address of the proxy listener that accepted (with sk_lookup the
	// accepted socket's Local is the original destination, not the listener's port), and
	// Index which of its SO_REUSEPORT sockets did.
	Listener string `json:"listener,omitempty"`
	Index    int    `json:"index,omitempty"`
	Local    string `json:"local"` // accepted socket's local address
	Peer     string `json:"peer"`  // accepted socket's peer address
	Orig     string `json:"orig,omitempty"`
	OrigErr  string `json:"orig_err,omitempty"` // SO_ORIGINAL_DST failed: errno text
	Err      string `json:"err,omitempty"`      // forward-mode proxy could not reach Orig
	// UpstreamSrc is the local address of a forward-mode proxy's connection to Orig.
	UpstreamSrc string `json:"upstream_src,omitempty"`
}

// Dial runs a client in the pod as uid/gid and returns one Result per target, in order.
func (p *Pod) Dial(tb testing.TB, uid, gid uint32, targets ...Target) []Result {
	tb.Helper()
	return p.DialWithin(tb, uid, gid, ClientTimeout, targets...)
}

// DialWithin is Dial giving each target timeout instead of ClientTimeout: for connections
// expected to time out, which nothing answers however long the client waits.
func (p *Pod) DialWithin(tb testing.TB, uid, gid uint32, timeout time.Duration, targets ...Target) []Result {
	tb.Helper()
	return dialWithin(tb, func(s ProcSpec) *Proc { return p.Start(tb, s) }, ProcSpec{UID: uid, GID: gid}, timeout, targets)
}

// DialGroups is Dial with supplementary groups.
func (p *Pod) DialGroups(tb testing.TB, uid, gid uint32, groups []uint32, targets ...Target) []Result {
	tb.Helper()
	return dial(tb, func(s ProcSpec) *Proc { return p.Start(tb, s) }, ProcSpec{UID: uid, GID: gid, Groups: groups}, targets)
}

// Dial runs a client (as root) in the remote netns, e.g. for inbound tests.
func (n *Network) Dial(tb testing.TB, targets ...Target) []Result {
	tb.Helper()
	return dial(tb, func(s ProcSpec) *Proc { return n.Start(tb, s) }, ProcSpec{}, targets)
}

func dial(tb testing.TB, start func(ProcSpec) *Proc, who ProcSpec, targets []Target) []Result {
	tb.Helper()
	return dialWithin(tb, start, who, ClientTimeout, targets)
}

func dialWithin(tb testing.TB, start func(ProcSpec) *Proc, who ProcSpec, timeout time.Duration, targets []Target) []Result {
	tb.Helper()
	args := []string{"client", "--timeout", timeout.String()}
	for _, t := range targets {
		args = append(args, "--target", t.String())
	}
	who.Args = args
	out := start(who).
		Wait(tb, time.Duration(len(targets))*timeout+readyTimeout)
	var res []Result
	dec := json.NewDecoder(strings.NewReader(out))
	for dec.More() {
		var r Result
		must(tb, dec.Decode(&r), "decode client output "+out)
		res = append(res, r)
	}
	if len(res) != len(targets) {
		tb.Fatalf("testpod: client printed %d results for %d targets: %s", len(res), len(targets), out)
	}
	return res
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
	d := Dialer(timeout, src)
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
		c, err = d.Dial(TCPNetwork(ap.Addr()), dst)
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
