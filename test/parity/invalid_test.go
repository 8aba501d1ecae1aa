package parity

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// istio's --drop-invalid (INVALID_DROP) guards against this: a packet of a captured
// inbound connection that conntrack finds INVALID (here: a segment far out of the TCP
// window, as a late or spoofed one is) is not translated back by NAT, so it reaches the
// pod addressed to the app's port, where no socket holds the connection, and the kernel
// answers with a reset that kills the client's connection. divert does no NAT: the
// connection's socket (sk_lookup handed it to the proxy) is addressed to the app's port
// itself, so the same packet lands on it and is answered with a duplicate ACK.
//
// Each backend gets a pod whose proxy holds an inbound connection open, an out-of-window
// ACK is injected from the client's side, and the client then asks the proxy something.
func TestInvalidPacketParity(t *testing.T) {
	for _, tc := range []struct {
		name        string
		backend     iptables.Backend // "" for eBPF
		dropInvalid bool
		reset       bool // the failure istio guards against
	}{
		{"iptables-nft without --drop-invalid: the connection is reset", iptables.BackendNFT, false, true},
		{"iptables-nft with --drop-invalid", iptables.BackendNFT, true, false},
		{"iptables-legacy without --drop-invalid: the connection is reset", iptables.BackendLegacy, false, true},
		{"iptables-legacy with --drop-invalid", iptables.BackendLegacy, true, false},
		{"ebpf with --drop-invalid (nothing to install)", "", true, false},
		{"ebpf without --drop-invalid", "", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := testpod.New(t)
			proxy := pod.Start(t, testpod.ProcSpec{UID: proxyUID, GID: proxyUID, Args: []string{"soak-proxy", "--listen", "0.0.0.0:15006"}})
			waitForLine(t, proxy, "ready")
			args := []string{}
			if tc.dropInvalid {
				args = append(args, "--drop-invalid")
			}
			cfg := divertest.Config(t, args...)
			counter := "ISTIO_DROP" // the rule whose packet count says conntrack found it INVALID
			if tc.backend != "" {
				if _, err := (iptables.Options{Backend: tc.backend}).Apply(context.Background(), pod.NetNSPath, cfg); err != nil {
					t.Fatal(err)
				}
			} else {
				divertest.Attach(t, pod, divertest.BPFFS(t), cfg)
				// No rule of divert's uses conntrack; this one makes it track the pod's
				// connections and counts what it finds INVALID, which then goes on.
				counter = "RETURN"
				iptablesCmd(t, pod.NetNSPath, iptables.BackendNFT, "-t", "mangle", "-A", "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", "RETURN")
			}
			if !tc.dropInvalid && tc.backend != "" {
				counter = "" // nothing counts it; the reset shows it
			}

			dst := netip.AddrPortFrom(pod.Addr, 8080)
			var conn *net.TCPConn
			if err := nsexec.Do(pod.Net.NetNSPath, func() error {
				d := net.Dialer{Timeout: testpod.ClientTimeout}
				d.SetMultipathTCP(false)
				c, err := d.Dial("tcp4", dst.String())
				if err == nil {
					conn = c.(*net.TCPConn)
				}
				return err
			}); err != nil {
				t.Fatalf("connect to %s: %v", dst, err)
			}
			defer conn.Close()
			snd, rcv := sequences(t, conn)
			src := netip.MustParseAddrPort(conn.LocalAddr().String())
			// Far beyond what the proxy's side allows, acknowledging exactly what it sent:
			// a reset answering it carries a sequence number the client must accept.
			injectACK(t, pod.Net.NetNSPath, src, dst, snd+1<<30, rcv)
			time.Sleep(200 * time.Millisecond)

			answer, err := ask(conn)
			switch {
			case tc.reset && err == nil:
				t.Errorf("the connection survived (answer %q); istio's rules without --drop-invalid should have let the reset through", answer)
			case tc.reset && !strings.Contains(err.Error(), "reset"):
				t.Errorf("want a reset, got %v", err)
			case !tc.reset && err != nil:
				t.Errorf("the connection did not survive the INVALID packet: %v", err)
			case !tc.reset && answer != dst.String():
				t.Errorf("the proxy read original destination %q, want %s", answer, dst)
			}
			if counter != "" {
				b := tc.backend
				if b == "" {
					b = iptables.BackendNFT
				}
				if n := invalidCount(t, pod.NetNSPath, b, counter); n == 0 {
					t.Errorf("conntrack found no packet INVALID: the test did not test anything")
				}
			}
		})
	}
}

// The queues of TCP_REPAIR_QUEUE (linux/tcp.h), which x/sys/unix does not name.
const (
	tcpRecvQueue = 1
	tcpSendQueue = 2
)

// sequences reads the next sequence number a socket sends and the next it expects, by
// putting it in repair mode for a moment (CAP_NET_ADMIN).
func sequences(t *testing.T, c *net.TCPConn) (snd, rcv uint32) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		s := int(fd)
		read := func(queue int) uint32 {
			if serr == nil {
				serr = unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue)
			}
			var v int
			if serr == nil {
				v, serr = unix.GetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
			}
			return uint32(v)
		}
		if serr = unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); serr != nil {
			return
		}
		snd, rcv = read(tcpSendQueue), read(tcpRecvQueue)
		if err := unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP); err != nil && serr == nil {
			serr = err
		}
	})
	if err != nil || serr != nil {
		t.Fatalf("read the client's sequence numbers: %v %v", err, serr)
	}
	return snd, rcv
}

// injectACK sends one bare ACK segment from src to dst, from the network namespace at
// netnsPath, through a raw socket (the kernel adds the IP header).
func injectACK(t *testing.T, netnsPath string, src, dst netip.AddrPort, seq, ack uint32) {
	t.Helper()
	seg := testpod.TCPSegment(src, dst, seq, ack, 0x10 /* ACK */, nil)
	if err := nsexec.Do(netnsPath, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, seg, 0, &unix.SockaddrInet4{Addr: dst.Addr().As4()})
	}); err != nil {
		t.Fatalf("inject an ACK: %v", err)
	}
}

// ask sends the soak proxy's question (one byte) and reads its answer: the original
// destination it read.
func ask(c *net.TCPConn) (string, error) {
	_ = c.SetDeadline(time.Now().Add(testpod.ClientTimeout))
	if _, err := c.Write([]byte{'?'}); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func iptablesCmd(t *testing.T, netnsPath string, b iptables.Backend, args ...string) string {
	t.Helper()
	out, err := nsexec.CombinedOutput(netnsPath, exec.Command("iptables-"+b.String(), args...))
	if err != nil {
		t.Fatalf("iptables-%s %v: %v: %s", b, args, err, out)
	}
	return string(out)
}

var countedLine = regexp.MustCompile(`^\s*([0-9]+)\s+[0-9]+\s+(\S+)\s.*ctstate INVALID`)

// invalidCount is the packet count of mangle PREROUTING's ctstate INVALID rule whose
// target is target.
func invalidCount(t *testing.T, netnsPath string, b iptables.Backend, target string) uint64 {
	t.Helper()
	out := iptablesCmd(t, netnsPath, b, "-t", "mangle", "-L", "PREROUTING", "-v", "-x", "-n")
	for _, l := range strings.Split(out, "\n") {
		if m := countedLine.FindStringSubmatch(l); m != nil && m[2] == target {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			return n
		}
	}
	t.Fatalf("no ctstate INVALID rule to %s in:\n%s", target, out)
	return 0
}

// waitForLine waits until the helper printed line.
func waitForLine(t *testing.T, pr *testpod.Proc, line string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(pr.Stdout(), line+"\n"); time.Sleep(20 * time.Millisecond) {
		if e := pr.Exited(); e != "" || time.Now().After(deadline) {
			t.Fatalf("helper not %q: %s", line, fmt.Sprint(e, pr.Stderr()))
		}
	}
}
