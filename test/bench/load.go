package bench

import (
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// LoadResult is what one bench-load run prints (one JSON object).
type LoadResult struct {
	// Conns is the number of connections the app completed, warm-up included (eBPF mode
	// checks the kernel's redirect counter against it).
	Conns int `json:"conns"`
	// Errors counts failed connections or requests; FirstErr is the first one.
	Errors   int    `json:"errors"`
	FirstErr string `json:"first_err,omitempty"`
	// WrongPath counts answers showing the connection took the wrong path: through a proxy
	// in direct mode, or straight to the server when a proxy hop was expected.
	WrongPath int `json:"wrong_path"`
	// LatNS are the measured latencies (warm-up excluded), in nanoseconds.
	LatNS []int64 `json:"lat_ns,omitempty"`
	// Count and Seconds: operations (connections or bytes) in the measured window.
	Count   int64   `json:"count"`
	Seconds float64 `json:"seconds"`
	// CPUMicros is the CPU time the --cgroups used in the measured window (their
	// cpu.stat usage_usec): the app, the proxy, the server, and the kernel's work on
	// their behalf.
	CPUMicros int64 `json:"cpu_us"`
}

// micros are the measured latencies in microseconds.
func (res LoadResult) micros() []float64 {
	us := make([]float64, len(res.LatNS))
	for i, ns := range res.LatNS {
		us[i] = float64(ns) / 1e3
	}
	return us
}

// runLoad: the application. It runs inside the pod's cgroup as an ordinary uid and uses
// blocking system calls on its own sockets, so the time measured is the kernel's and the
// proxy's, not a scheduler's. Sockets close with SO_LINGER 0 (a reset): the app leaves no
// TIME_WAIT behind, which would otherwise pile up over thousands of connections and slow
// down or exhaust the choice of source ports.
func runLoad(args []string) error {
	fs := flag.NewFlagSet(cmdLoad, flag.ContinueOnError)
	kind := fs.String("kind", "conn", "conn (B1: sequential connections) | rate (B2) | rr (B3: one keep-alive connection) | bulk (B3)")
	dstText := fs.String("dst", "", "ip:port the app dials")
	proxied := fs.Bool("proxied", true, "a proxy hop is expected (false: direct)")
	n := fs.Int("n", 1000, "measured connections (conn) or requests (rr)")
	warmup := fs.Int("warmup", 100, "discarded connections or requests first")
	clients := fs.Int("clients", 2, "parallel clients (rate)")
	duration := fs.Duration("duration", 3*time.Second, "measured time (rate)")
	warmupDur := fs.Duration("warmup-duration", 300*time.Millisecond, "discarded time first (rate)")
	bytes := fs.Int64("bytes", 256<<20, "bytes to send (bulk)")
	if err := parseWithCgroups(fs, args); err != nil {
		return err
	}
	dst, err := netip.ParseAddrPort(*dstText)
	if err != nil {
		return fmt.Errorf("--dst: %w", err)
	}
	var sa unix.Sockaddr
	if a := dst.Addr().Unmap(); a.Is4() {
		sa = &unix.SockaddrInet4{Addr: a.As4(), Port: int(dst.Port())}
	} else {
		sa = &unix.SockaddrInet6{Addr: a.As16(), Port: int(dst.Port())}
	}
	var res LoadResult
	switch *kind {
	case "conn":
		res = loadConns(sa, *proxied, *warmup, *n)
	case "rate":
		res = loadRate(sa, *proxied, *clients, *warmupDur, *duration)
	case "rr":
		res = loadRR(sa, *proxied, *warmup, *n)
	case "bulk":
		res = loadBulk(sa, *bytes)
	default:
		return fmt.Errorf("unknown --kind %q", *kind)
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func loadConns(sa unix.Sockaddr, proxied bool, warmup, n int) LoadResult {
	var req, resp [msgSize]byte
	req[0] = opRR
	return sequential(warmup, n, false, func(int) (bool, error) { return oneConn(sa, proxied, req[:], resp[:]) })
}

func loadRate(sa unix.Sockaddr, proxied bool, clients int, warmup, duration time.Duration) LoadResult {
	return parallel(clients, 0, warmup, duration, func() func(int) (bool, error) {
		var req, resp [msgSize]byte
		req[0] = opRR
		return func(int) (bool, error) { return oneConn(sa, proxied, req[:], resp[:]) }
	})
}

// loadRR makes its requests on one keep-alive connection; only the first answer shows the
// path.
func loadRR(sa unix.Sockaddr, proxied bool, warmup, n int) LoadResult {
	var t tally
	fd, err := dial(sa)
	if err != nil {
		t.add(false, err)
		return t.LoadResult
	}
	defer closeReset(fd)
	local, err := unix.Getsockname(fd)
	if err != nil {
		t.add(false, err)
		return t.LoadResult
	}
	var req, resp [msgSize]byte
	req[0] = opRR
	res := sequential(warmup, n, true, func(i int) (bool, error) {
		err := roundTrip(fd, req[:], resp[:])
		return err == nil && i == 0 && wrongPath(local, resp[:], proxied), err
	})
	res.Conns = 1 // one connection, however many requests
	return res
}

// loadBulk streams bytes on one connection and times it until the server confirms it has
// received them all. A smaller transfer on its own connection warms up first.
func loadBulk(sa unix.Sockaddr, bytes int64) LoadResult {
	runtime.LockOSThread()
	var res LoadResult
	for i, size := range []int64{max(bytes/16, 1<<20), bytes} {
		var cpu cpuMeter
		cpu.start()
		start := time.Now()
		got, err := bulkOnce(sa, size)
		d := time.Since(start)
		cpuMicros := cpu.stop()
		if err == nil && got != size {
			err = fmt.Errorf("server received %d of %d bytes", got, size)
		}
		if err != nil {
			res.Errors++
			res.FirstErr = err.Error()
			return res
		}
		res.Conns++
		if i == 1 {
			res.Count, res.Seconds, res.CPUMicros = size, d.Seconds(), cpuMicros
		}
	}
	return res
}

func bulkOnce(sa unix.Sockaddr, size int64) (int64, error) {
	fd, err := dial(sa)
	if err != nil {
		return 0, err
	}
	defer closeReset(fd)
	buf := make([]byte, 256<<10)
	buf[0] = opBulk
	if err := writeAll(fd, buf[:msgSize]); err != nil {
		return 0, err
	}
	buf[0] = 0
	for left := size; left > 0; {
		k := min(left, int64(len(buf)))
		if err := writeAll(fd, buf[:k]); err != nil {
			return 0, err
		}
		left -= k
	}
	if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
		return 0, err
	}
	var cnt [8]byte
	if err := readFull(fd, cnt[:]); err != nil {
		return 0, fmt.Errorf("read count: %w", err)
	}
	return int64(binary.BigEndian.Uint64(cnt[:])), nil
}

// oneConn: connect, one request/response, close (reset). It reports whether the answer
// shows the wrong path.
func oneConn(sa unix.Sockaddr, proxied bool, req, resp []byte) (bool, error) {
	fd, err := dial(sa)
	if err != nil {
		return false, err
	}
	defer closeReset(fd)
	if err := roundTrip(fd, req, resp); err != nil {
		return false, err
	}
	local, err := unix.Getsockname(fd)
	if err != nil {
		return false, err
	}
	return wrongPath(local, resp, proxied), nil
}

// wrongPath compares the peer the server saw with the app's own address: equal means the
// app reached the server itself, different means a proxy dialled it.
func wrongPath(local unix.Sockaddr, resp []byte, proxied bool) bool {
	var addr netip.Addr
	var port int
	switch l := local.(type) {
	case *unix.SockaddrInet4:
		addr, port = netip.AddrFrom4(l.Addr), l.Port
	case *unix.SockaddrInet6:
		addr, port = netip.AddrFrom16(l.Addr).Unmap(), l.Port
	default:
		return true
	}
	same := [16]byte(resp[0:16]) == addr.As16() && int(binary.BigEndian.Uint16(resp[16:18])) == port
	return same == proxied
}

func dial(sa unix.Sockaddr) (int, error) {
	family := unix.AF_INET
	if _, ok := sa.(*unix.SockaddrInet6); ok {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	// No SO_SNDTIMEO/SO_RCVTIMEO: with a timeout the kernel does not restart a connect or
	// read interrupted by the Go runtime's signals (SA_RESTART), it fails with EINTR. A
	// stuck run is ended by the benchmark's timeout for the whole process instead.
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("connect: %w", err)
	}
	return fd, nil
}

func closeReset(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	unix.Close(fd)
}

func roundTrip(fd int, req, resp []byte) error {
	if err := writeAll(fd, req); err != nil {
		return err
	}
	return readFull(fd, resp)
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		b = b[n:]
	}
	return nil
}

func readFull(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Read(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("read: %w", io.ErrUnexpectedEOF)
		}
		b = b[n:]
	}
	return nil
}
