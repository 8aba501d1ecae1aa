package testpod

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
)

// The raw-syscall dial (v4-mapped and MPTCP targets) survives signals: a connect that is
// still waiting for its handshake while the thread is signalled again and again completes
// with one connection, as without signals (issue 23: "interrupted system call" in the
// parity suite under TCG). The handshake is held back by a full accept queue, which drops
// the first SYN; the client's retransmission one second later gets through once the queue
// is drained, and every few milliseconds until then the dialling thread gets a SIGURG (the
// Go runtime's own preemption signal, harmless to it).
func TestDialSocketSurvivesSignals(t *testing.T) {
	for _, tc := range []struct {
		name            string
		v4mapped, mptcp bool
	}{{"v4-mapped", true, false}, {"mptcp", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.mptcp {
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_MPTCP)
				if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENOPROTOOPT) {
					t.Skipf("this kernel has no MPTCP sockets: %v", err)
				}
				if err == nil {
					unix.Close(fd)
				}
			}
			p := New(t)
			err := nsexec.Do(p.NetNSPath, func() error {
				return dialUnderSignals(t, tc.v4mapped, tc.mptcp)
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// dialUnderSignals runs on a locked thread in a pod's netns.
func dialUnderSignals(t *testing.T, v4mapped, mptcp bool) error {
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(lfd)
	lo := [4]byte{127, 0, 0, 1}
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: lo}); err != nil {
		return err
	}
	// Backlog 0: one established connection fills the accept queue.
	if err := unix.Listen(lfd, 0); err != nil {
		return err
	}
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return err
	}
	port := sa.(*unix.SockaddrInet4).Port
	filler, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(filler)
	if err := unix.Connect(filler, &unix.SockaddrInet4{Addr: lo, Port: port}); err != nil {
		return err
	}
	// The filler's connect returns on the SYN-ACK; the listener queues it only once its
	// ACK is processed, which a slow guest may not have done yet. Wait until the listener
	// is readable (its accept queue holds the filler), so the dial's first SYN is dropped.
	for {
		pfd := []unix.PollFd{{Fd: int32(lfd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 5000)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("the filler connection never reached the accept queue")
		}
		break
	}

	pid, tid := unix.Getpid(), unix.Gettid()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var signals int
	var drainErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		drain := time.After(300 * time.Millisecond)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-drain:
				// Accept the filler: the dial's retransmitted SYN finds room.
				nfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
				if err != nil {
					drainErr = err
					return
				}
				unix.Close(nfd)
			case <-tick.C:
				if err := unix.Tgkill(pid, tid, unix.SIGURG); err == nil {
					signals++
				}
			}
		}
	}()
	start := time.Now()
	c, err := dialSocket(netip.AddrPortFrom(netip.AddrFrom4(lo), uint16(port)).String(), netip.Addr{}, 10*time.Second, Shape{V4Mapped: v4mapped, MPTCP: mptcp})
	took := time.Since(start)
	close(stop)
	wg.Wait()
	if drainErr != nil {
		return drainErr
	}
	if err != nil {
		t.Errorf("dial under %d signals: %v (after %v)", signals, err, took)
		return nil
	}
	defer c.Close()
	// Proof the dial waited through the signals: it needed the retransmission.
	if took < 800*time.Millisecond || signals < 100 {
		t.Errorf("dial took %v under %d signals: the handshake was not held back, the test proves nothing", took, signals)
	}
	// One connect, one connection: the one the dialler holds.
	if err := unix.SetNonblock(lfd, true); err != nil {
		return err
	}
	nfd, peer, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		t.Errorf("the dialled connection is not in the accept queue: %v", err)
		return nil
	}
	unix.Close(nfd)
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	if in := peer.(*unix.SockaddrInet4); local.Port() != uint16(in.Port) || local.Addr().Unmap() != netip.AddrFrom4(in.Addr) {
		t.Errorf("accepted a connection from %v:%d, the dialler is %v", in.Addr, in.Port, local)
	}
	if extra, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC); !errors.Is(err, unix.EAGAIN) {
		if err == nil {
			unix.Close(extra)
		}
		t.Errorf("a second connection from one dial (accept: %v)", err)
	}
	return nil
}
