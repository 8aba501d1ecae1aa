// Package sockio holds the raw socket calls that must survive signals. The Go runtime
// signals its own threads (SIGURG preemption, SIGCHLD, profiling), so any raw syscall that
// the kernel does not restart can fail with EINTR; under a slow clock (qemu TCG) it does.
package sockio

import (
	"errors"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// ConnectOnce makes one blocking connect() on fd, which has SO_SNDTIMEO set, and waits
// for its outcome until deadline, whatever signals arrive. With a send timeout the kernel
// never restarts an interrupted connect (signal(7), SA_RESTART or not): it fails with EINTR
// while the handshake goes on in the background, and a second connect() would fail with
// EALREADY. The outcome is then read as for a non-blocking connect: poll for POLLOUT, then
// SO_ERROR. connect() is issued once, so the connect hooks run once per dial.
// An expired SO_SNDTIMEO is os.ErrDeadlineExceeded.
func ConnectOnce(fd int, sa unix.Sockaddr, deadline time.Time) error {
	err := unix.Connect(fd, sa)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINPROGRESS): // SO_SNDTIMEO expired
		return os.ErrDeadlineExceeded
	case !errors.Is(err, unix.EINTR):
		return err
	}
	return WaitConnected(fd, deadline)
}

// WaitConnected waits until deadline for the outcome of a connect() in progress on fd (a
// non-blocking one, or one a signal interrupted): poll for POLLOUT, then SO_ERROR. Signals
// do not cut the wait short. An expired deadline is os.ErrDeadlineExceeded.
func WaitConnected(fd int, deadline time.Time) error {
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return os.ErrDeadlineExceeded
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		// poll is never restarted after a signal either.
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if errors.Is(err, unix.EINTR) || (err == nil && n == 0) {
			continue
		}
		if err != nil {
			return err
		}
		soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return err
		}
		if soErr != 0 {
			return unix.Errno(soErr)
		}
		return nil
	}
}

// RetryEINTR calls call until it fails with something other than EINTR. Only for calls
// that are safe to repeat (send, recv, read, a non-blocking connect's first try).
func RetryEINTR(call func() error) error {
	for {
		if err := call(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}
