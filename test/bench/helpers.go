package bench

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/origdst"
)

// The benchmark's own helper processes. testpod starts processes in a pod as the test binary
// re-executed with DIVERT_TESTPOD_HELPER=1 and a command line; the commands below are ours,
// everything else is left to testpod.RunHelperIfRequested.
//
//	bench-server  echo server in the remote netns (request/response and bulk sink)
//	bench-proxy   a small forwarding proxy: SO_ORIGINAL_DST (or a fixed upstream) and relay
//	bench-load    the application: a load generator measuring each connection in-process
//
// and B7's, in dns.go.
const (
	helperEnv = "DIVERT_TESTPOD_HELPER"
	readyLine = "ready"

	cmdServer = "bench-server"
	cmdProxy  = "bench-proxy"
	cmdLoad   = "bench-load"
)

// The wire protocol. A request is msgSize bytes. Its first byte says what it is:
//
//	'R' request/response: the server answers msgSize bytes, the first 6 of which are the peer
//	    address it saw (IPv4, port, big endian) and the rest an echo of the request; the
//	    connection may carry more requests.
//	'B' bulk: the client streams bytes until it half-closes; the server then answers with
//	    the number of bytes it received after the header (8 bytes, big endian) and closes.
const (
	msgSize  = 64
	opRR     = 'R'
	opBulk   = 'B'
	ioBuf    = 64 << 10
	sockWait = 5 * time.Second // the proxy's upstream connect timeout
)

// RunHelperIfRequested runs one of the benchmark's helper commands when testpod started the
// binary as a helper with one of them; otherwise it returns and testpod's own helpers (or
// the benchmark itself) run.
func RunHelperIfRequested() {
	if os.Getenv(helperEnv) != "1" || len(os.Args) < 2 {
		return
	}
	cmds := map[string]func([]string) error{cmdServer: runServer, cmdProxy: runProxy, cmdLoad: runLoad,
		cmdDNS: runDNS, cmdDNSQuery: runDNSQuery}
	run, ok := cmds[os.Args[1]]
	if !ok {
		return
	}
	outliveForkingThread()
	if err := run(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	os.Exit(0)
}

// outliveForkingThread replaces the parent-death signal testpod sets (SIGKILL when the
// forking thread exits) by a watch on the parent process. The parent-death signal follows
// the thread that forked us, and in the benchmark's process threads do exit: testpod creates
// each network namespace on a thread it then lets die, and that may be a thread that earlier
// started a server or proxy, which would be killed mid-run. We still exit as soon as the
// benchmark process itself is gone (we are reparented).
func outliveForkingThread() {
	ppid := os.Getppid()
	_ = unix.Prctl(unix.PR_SET_PDEATHSIG, 0, 0, 0, 0)
	if os.Getppid() != ppid {
		os.Exit(1)
	}
	go func() {
		for range time.Tick(200 * time.Millisecond) {
			if os.Getppid() != ppid {
				os.Exit(1)
			}
		}
	}()
}

// listen opens a plain TCP (not MPTCP, Go's default for listeners) listener: IPv4 for an
// IPv4 address, both families for [::].
func listen(addr string) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	network := "tcp4"
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Is6() {
		network = "tcp" // Go's [::] listener takes both families
	}
	return lc.Listen(context.Background(), network, addr)
}

// tcpNetwork is Go's network for dialling a: "tcp4" or "tcp6".
func tcpNetwork(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "tcp4"
	}
	return "tcp6"
}

// runServer: the server in the remote netns.
func runServer(args []string) error {
	fs := flag.NewFlagSet(cmdServer, flag.ContinueOnError)
	addr := fs.String("listen", "0.0.0.0:8080", "ip:port")
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
		go serve(c.(*net.TCPConn))
	}
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, ioBuf); return &b }}

func serve(c *net.TCPConn) {
	defer c.Close()
	// The peer, 16 bytes (IPv4 as ::ffff:a.b.c.d) and the port, for the app's wrongPath.
	var peer [18]byte
	if ap := c.RemoteAddr().(*net.TCPAddr).AddrPort(); ap.IsValid() {
		a16 := ap.Addr().Unmap().As16()
		copy(peer[:16], a16[:])
		binary.BigEndian.PutUint16(peer[16:], ap.Port())
	}
	var msg [msgSize]byte
	for {
		if _, err := io.ReadFull(c, msg[:]); err != nil {
			return // EOF or reset: the client is done
		}
		switch msg[0] {
		case opRR:
			copy(msg[:len(peer)], peer[:])
			if _, err := c.Write(msg[:]); err != nil {
				return
			}
		case opBulk:
			bp := bufPool.Get().(*[]byte)
			var n int64
			for {
				k, err := c.Read(*bp)
				n += int64(k)
				if err != nil {
					break
				}
			}
			bufPool.Put(bp)
			var cnt [8]byte
			binary.BigEndian.PutUint64(cnt[:], uint64(n))
			_, _ = c.Write(cnt[:])
			return
		default:
			return
		}
	}
}

// runProxy: a forwarding proxy in the style of Envoy's outbound listener. For every accepted
// connection it finds the upstream (SO_ORIGINAL_DST, or --upstream for the explicit mode,
// where the app dials the proxy itself), dials it and relays both ways, half-closes included.
// It must run as the proxy uid so that its own connections are not captured. Anything that
// goes wrong is written to stderr, which the benchmark requires to stay empty.
func runProxy(args []string) error {
	fs := flag.NewFlagSet(cmdProxy, flag.ContinueOnError)
	addr := fs.String("listen", "0.0.0.0:15001", "ip:port")
	upstream := fs.String("upstream", "", "fixed upstream ip:port instead of SO_ORIGINAL_DST")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var fixed netip.AddrPort
	if *upstream != "" {
		var err error
		if fixed, err = netip.ParseAddrPort(*upstream); err != nil {
			return err
		}
	}
	ln, err := listen(*addr)
	if err != nil {
		return err
	}
	fmt.Println(readyLine)
	var failures atomic.Int64
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			if err := relay(c.(*net.TCPConn), fixed); err != nil && failures.Add(1) <= 10 {
				fmt.Fprintf(os.Stderr, "proxy: %v\n", err)
			}
		}()
	}
}

var upstreamDialer = func() *net.Dialer {
	d := &net.Dialer{Timeout: sockWait}
	d.SetMultipathTCP(false)
	return d
}()

func relay(c *net.TCPConn, fixed netip.AddrPort) error {
	defer c.Close()
	dst := fixed
	if !dst.IsValid() {
		var err error
		if dst, err = origdst.Get(c); err != nil {
			return fmt.Errorf("SO_ORIGINAL_DST of %s: %w", c.RemoteAddr(), err)
		}
	}
	uc, err := upstreamDialer.Dial(tcpNetwork(dst.Addr()), dst.String())
	if err != nil {
		return fmt.Errorf("dial %s: %w", dst, err)
	}
	up := uc.(*net.TCPConn)
	defer up.Close()
	done := make(chan struct{})
	go func() {
		pipe(up, c)
		_ = up.CloseWrite()
		close(done)
	}()
	pipe(c, up)
	_ = c.CloseWrite()
	<-done
	return nil
}

// pipe copies with read/write through a pooled buffer (as Envoy does), not splice. Errors
// end the copy: a reset from the app (it closes with SO_LINGER 0) is the normal end.
func pipe(dst, src *net.TCPConn) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	for {
		n, err := src.Read(*bp)
		if n > 0 {
			if _, werr := dst.Write((*bp)[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

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
	cgroups := fs.String("cgroups", "", "comma-separated cgroup v2 directories whose CPU time to report")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cgroups != "" {
		cpuDirs = strings.Split(*cgroups, ",")
		if _, err := cpuUsage(); err != nil {
			return err
		}
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

// cpuDirs are the cgroups whose CPU time bench-load reports.
var cpuDirs []string

// cpuUsage sums usage_usec of cpuDirs' cpu.stat: exact scheduler time of every task in them
// (cpu.stat has it whether or not the cpu controller is enabled), including softirq work
// done while they ran.
func cpuUsage() (int64, error) {
	var total int64
	for _, d := range cpuDirs {
		b, err := os.ReadFile(filepath.Join(d, "cpu.stat"))
		if err != nil {
			return 0, err
		}
		found := false
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
				n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				if err != nil {
					return 0, err
				}
				total += n
				found = true
			}
		}
		if !found {
			return 0, fmt.Errorf("%s/cpu.stat: no usage_usec", d)
		}
	}
	return total, nil
}

// cpuMeter measures the CPU time of cpuDirs between start and stop.
type cpuMeter struct{ t0 int64 }

func (m *cpuMeter) start() { m.t0, _ = cpuUsage() }
func (m *cpuMeter) stop() int64 {
	t1, _ := cpuUsage()
	return t1 - m.t0
}

// tally collects outcomes; it is not safe for concurrent use.
type tally struct{ LoadResult }

func (t *tally) add(wrongPath bool, err error) {
	switch {
	case err != nil:
		t.Errors++
		if t.FirstErr == "" {
			t.FirstErr = err.Error()
		}
	case wrongPath:
		t.WrongPath++
		t.Conns++
	default:
		t.Conns++
	}
}

func loadConns(sa unix.Sockaddr, proxied bool, warmup, n int) LoadResult {
	runtime.LockOSThread()
	var t tally
	t.LatNS = make([]int64, 0, n)
	var req, resp [msgSize]byte
	req[0] = opRR
	var cpu cpuMeter
	for i := range warmup + n {
		if i == warmup {
			cpu.start()
		}
		start := time.Now()
		wrong, err := oneConn(sa, proxied, req[:], resp[:])
		d := time.Since(start)
		t.add(wrong, err)
		if i >= warmup && err == nil {
			t.LatNS = append(t.LatNS, int64(d))
		}
	}
	t.CPUMicros = cpu.stop()
	t.Count = int64(len(t.LatNS))
	return t.LoadResult
}

func loadRate(sa unix.Sockaddr, proxied bool, clients int, warmup, duration time.Duration) LoadResult {
	var measuring, stop atomic.Bool
	tallies := make([]tally, clients)
	counts := make([]int64, clients)
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			var req, resp [msgSize]byte
			req[0] = opRR
			for !stop.Load() {
				m := measuring.Load()
				wrong, err := oneConn(sa, proxied, req[:], resp[:])
				tallies[c].add(wrong, err)
				if m && err == nil && !stop.Load() {
					counts[c]++
				}
			}
		}()
	}
	time.Sleep(warmup)
	var cpu cpuMeter
	cpu.start()
	measuring.Store(true)
	start := time.Now()
	time.Sleep(duration)
	stop.Store(true)
	elapsed := time.Since(start)
	cpuMicros := cpu.stop()
	wg.Wait()
	res := LoadResult{CPUMicros: cpuMicros}
	for c := range clients {
		res.Conns += tallies[c].Conns
		res.Errors += tallies[c].Errors
		res.WrongPath += tallies[c].WrongPath
		if res.FirstErr == "" {
			res.FirstErr = tallies[c].FirstErr
		}
		res.Count += counts[c]
	}
	res.Seconds = elapsed.Seconds()
	return res
}

func loadRR(sa unix.Sockaddr, proxied bool, warmup, n int) LoadResult {
	runtime.LockOSThread()
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
	t.Conns = 1
	t.LatNS = make([]int64, 0, n)
	var req, resp [msgSize]byte
	req[0] = opRR
	var cpu cpuMeter
	for i := range warmup + n {
		if i == warmup {
			cpu.start()
		}
		start := time.Now()
		err := roundTrip(fd, req[:], resp[:])
		d := time.Since(start)
		if err != nil {
			t.Errors++
			t.FirstErr = err.Error()
			break
		}
		if i == 0 && wrongPath(local, resp[:], proxied) {
			t.WrongPath++
		}
		if i >= warmup {
			t.LatNS = append(t.LatNS, int64(d))
		}
	}
	t.CPUMicros = cpu.stop()
	t.Count = int64(len(t.LatNS))
	return t.LoadResult
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
