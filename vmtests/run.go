package vmtests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync/atomic"
	"syscall"
	"time"
)

// Guest is what every way of booting a guest shares: where its output goes and when it is
// given up on.
type Guest struct {
	Console string // file receiving the kernel and test output
	Results string // file the init writes its result lines to
	Timeout time.Duration
	// Stall, if set, also kills the guest when the Results file has not grown for that
	// long: a wedged kernel is caught one package's time after the last result, not at
	// the end of the whole run's Timeout.
	Stall time.Duration
	// BootStall, if set, kills the guest when the Results file is still empty that long
	// after the start: a guest wedged while booting (ParseGuest's DiedBooting, which
	// vmtest boots once more) is given up on in minutes, not after Stall.
	BootStall time.Duration
	Stream    io.Writer // if set, also gets the console as it is written
}

// Boot runs the VM monitor (qemu, or vng running qemu) name with args and waits for the
// guest to power off. It reports timedOut when it had to kill the monitor (Timeout, Stall
// or BootStall); the monitor's exit status says nothing about the tests and is ignored beyond a
// failure to start. prepare, if set, adjusts the command before it starts. cpu is the
// monitor's CPU time, which unlike wall time hardly depends on what else the host runs.
func (g Guest) Boot(ctx context.Context, name string, args []string, prepare func(*exec.Cmd)) (timedOut bool, cpu time.Duration, err error) {
	con, err := os.Create(g.Console)
	if err != nil {
		return false, 0, err
	}
	defer con.Close()
	// Always a pipe, never the file itself: the child may reopen its stdout through
	// /proc/self/fd/1 (vng does), which would start writing at offset 0 again.
	out := io.MultiWriter(con)
	if g.Stream != nil {
		out = io.MultiWriter(con, g.Stream)
	}
	fmt.Fprintf(con, "# %s %q\n", name, args)
	ctx, cancel := context.WithTimeout(ctx, g.Timeout)
	defer cancel()
	var stalled atomic.Bool
	if g.Stall > 0 || g.BootStall > 0 {
		go WatchStall(ctx, g.Results, g.BootStall, g.Stall, func() { stalled.Store(true); cancel() })
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = nil // /dev/null: the guest gets no input
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the runner
	cmd.WaitDelay = 5 * time.Second
	if prepare != nil {
		prepare(cmd)
	}
	err = cmd.Run()
	if cmd.ProcessState != nil {
		cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || stalled.Load() {
		return true, cpu, nil
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		return false, cpu, fmt.Errorf("%s: %w", name, err)
	}
	return false, cpu, nil
}
