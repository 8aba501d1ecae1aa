package bench

import (
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshdivert/divert/internal/origdst"
	"github.com/meshdivert/divert/test/testpod"
)

// The benchmark's own helper processes, started in a pod by testpod's helper protocol
// (testpod.RunHelperIfRequested runs them, next to testpod's own):
//
//	bench-server  echo server in the remote netns (request/response and bulk sink)
//	bench-proxy   a small forwarding proxy: SO_ORIGINAL_DST (or a fixed upstream) and relay
//	bench-load    the application: a load generator measuring each connection in-process
//	              (load.go)
//
// and B7's, in dns.go.
const (
	cmdServer = "bench-server"
	cmdProxy  = "bench-proxy"
	cmdLoad   = "bench-load"
)

// helpers are the benchmark's helper commands.
var helpers = testpod.Helpers{cmdServer: runServer, cmdProxy: runProxy, cmdLoad: runLoad,
	cmdDNS: runDNS, cmdDNSQuery: runDNSQuery}

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

// runServer: the server in the remote netns.
func runServer(args []string) error {
	fs := flag.NewFlagSet(cmdServer, flag.ContinueOnError)
	addr := fs.String("listen", "0.0.0.0:8080", "ip:port")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return testpod.Serve(*addr, serve)
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
	var failures atomic.Int64
	return testpod.Serve(*addr, func(c *net.TCPConn) {
		if err := relay(c, fixed); err != nil && failures.Add(1) <= 10 {
			fmt.Fprintf(os.Stderr, "proxy: %v\n", err)
		}
	})
}

var upstreamDialer = testpod.Dialer(sockWait, netip.Addr{})

func relay(c *net.TCPConn, fixed netip.AddrPort) error {
	defer c.Close()
	dst := fixed
	if !dst.IsValid() {
		var err error
		if dst, err = origdst.Get(c); err != nil {
			return fmt.Errorf("SO_ORIGINAL_DST of %s: %w", c.RemoteAddr(), err)
		}
	}
	uc, err := upstreamDialer.Dial(testpod.TCPNetwork(dst.Addr()), dst.String())
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
