package vmtests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// Qemu describes one guest boot.
type Qemu struct {
	Kernel  string // vmlinux (booted through PVH) or bzImage
	Initrd  string
	Append  string // extra kernel command line
	Accel   string // tcg (default) or kvm
	MemMB   int
	CPUs    int
	Console string // file receiving the first serial port: kernel and test output
	Results string // file receiving the second serial port: the init's result lines
	Timeout time.Duration
	// Stall, if set, also kills the guest when the Results file has not grown for that
	// long: a wedged kernel is caught one package's time after the last result, not at
	// the end of the whole run's Timeout.
	Stall  time.Duration
	Stream io.Writer // if set, also gets the console as it is written
}

// Run boots the guest and waits for it to power off. It reports timedOut when it had to
// kill qemu at Timeout; qemu's exit status says nothing about the tests and is ignored
// beyond a failure to start.
func (q Qemu) Run(ctx context.Context) (timedOut bool, cpu time.Duration, err error) {
	accel := q.Accel
	if accel == "" {
		accel = "tcg"
	}
	model := "max" // TCG: all emulated features, RDRAND among them, so the guest's RNG is ready at once
	if accel == "kvm" {
		model = "host"
	}
	con, err := os.Create(q.Console)
	if err != nil {
		return false, 0, err
	}
	defer con.Close()
	// Always a pipe, never the file itself: the child may reopen its stdout through
	// /proc/self/fd/1 (vng does), which would start writing at offset 0 again.
	out := io.MultiWriter(con)
	if q.Stream != nil {
		out = io.MultiWriter(con, q.Stream)
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", accel, "-cpu", model, "-m", strconv.Itoa(q.MemMB), "-smp", strconv.Itoa(q.CPUs),
		"-kernel", q.Kernel, "-initrd", q.Initrd,
		// ttyS0: console on qemu's stdout; ttyS1: results, a file only the init writes to.
		"-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
		"-chardev", "file,id=res,path=" + q.Results, "-serial", "chardev:res",
		"-append", "console=ttyS0,115200 panic=-1 " + q.Append,
	}
	ctx, cancel := context.WithTimeout(ctx, q.Timeout)
	defer cancel()
	var stalled atomic.Bool
	if q.Stall > 0 {
		go WatchStall(ctx, q.Results, q.Stall, func() { stalled.Store(true); cancel() })
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	cmd.Stdin = nil // /dev/null: the guest gets no input
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the runner
	cmd.WaitDelay = 5 * time.Second
	fmt.Fprintf(con, "# qemu-system-x86_64 %q\n", args)
	err = cmd.Run()
	if cmd.ProcessState != nil {
		// CPU time, unlike wall time, hardly depends on what else the host is running.
		cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || stalled.Load() {
		return true, cpu, nil
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		return false, cpu, fmt.Errorf("qemu-system-x86_64: %w", err)
	}
	return false, cpu, nil
}

// WatchStall calls kill once the file at path has not grown for stall, and returns when
// ctx ends.
func WatchStall(ctx context.Context, path string, stall time.Duration, kill func()) {
	var size int64 = -1
	last := time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if fi, err := os.Stat(path); err == nil && fi.Size() != size {
			size, last = fi.Size(), time.Now()
		}
		if time.Since(last) > stall {
			kill()
			return
		}
	}
}
