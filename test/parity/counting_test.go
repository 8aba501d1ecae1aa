package parity

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// TestRetransmittedSYNCountsAgain: a SYN the pod drops after sk_lookup ran (here the
// listener's accept queue is full) and the client retransmits runs sk_lookup, and counts,
// once more for the same connection; the counting rule accepts it and the pod's
// ListenOverflows shows why.
func TestRetransmittedSYNCountsAgain(t *testing.T) {
	pod := testpod.New(t)
	cfg := divertest.Config(t)
	att := divertest.Attach(t, pod, divertest.BPFFS(t), cfg)
	vc := divertest.NewVerdictCheck(t, att)
	// 15090 is excluded inbound by default (-d): the connection passes to the listener.
	dst := netip.AddrPortFrom(pod.Addr, 15090)
	v := cfg.Decide(policy.Conn{Direction: policy.Inbound, Dst: dst, DstLocal: true})

	// A listener with a backlog of 0 that never accepts: one connection fills its queue.
	var lfd int
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(nsexec.Do(pod.NetNSPath, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		lfd = fd
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}); err != nil {
			return err
		}
		return unix.Listen(fd, 0)
	}))
	t.Cleanup(func() { unix.Close(lfd) })
	dial := func(timeout time.Duration) (net.Conn, error) {
		var c net.Conn
		err := nsexec.Do(pod.Net.NetNSPath, func() error {
			d := net.Dialer{Timeout: timeout}
			d.SetMultipathTCP(false)
			var err error
			c, err = d.DialContext(context.Background(), "tcp4", dst.String())
			return err
		})
		return c, err
	}
	first, err := dial(5 * time.Second)
	must(err)
	t.Cleanup(func() { first.Close() })

	vc.Begin(t, cfg)
	// The SYN at 0 and its retransmission at ~1 s (the initial RTO) are dropped.
	if c, err := dial(2500 * time.Millisecond); err == nil || !errors.Is(err, context.DeadlineExceeded) && !strings.Contains(err.Error(), "timeout") {
		if c != nil {
			c.Close()
		}
		t.Fatalf("the second connection to a full queue: %v, want a timeout", err)
	}
	deltas, events := vc.Collect(t)
	j := divertest.Judge(decisionsOf(v), deltas, events, map[string]policy.Reason{}, vc.Inbound)
	if len(j.Problems) != 0 || !j.Repeated || len(events) < 2 {
		t.Errorf("want 2 or more runs of one connection, all %s, each counted; got problems %q, runs %v", v.Reason, j.Problems, events)
	}
	stats := divertest.ReadTCPStats(t, pod.NetNSPath).Since(vc.PodStats)
	if !strings.Contains(stats, "TcpExt.ListenOverflows +") {
		t.Errorf("the pod's ListenOverflows did not rise: %s", stats)
	}
	// The same runs are not the model's if it decided another reason, or two connections.
	if j := divertest.Judge([]policy.Reason{policy.ReasonInboundIncludedPort}, deltas, events, map[string]policy.Reason{}, vc.Inbound); len(j.Problems) == 0 {
		t.Errorf("the rule accepts these runs for inbound-included-port too: %v", events)
	}
	if j := divertest.Judge(append(decisionsOf(v), v.Reason), deltas, events, map[string]policy.Reason{}, vc.Inbound); len(j.Problems) == 0 {
		t.Errorf("the rule accepts these runs as two connections: %v", events)
	}
	t.Logf("%d runs, counted %d; pod: %s", len(events), deltas[maps.IPv4][v.Reason], stats)
}
