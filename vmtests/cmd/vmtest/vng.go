package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshdivert/divert/vmtests"
)

// runVng boots the kernel with virtme-ng instead of our own initramfs. vng's guest sees
// the host's root read-only (9p), so the test binaries, their sources and the host's
// iptables/haproxy are used in place; the guest's modprobe autoloads modules from the
// kernel package (vng runs depmod on it). Our init runs as an ordinary command there and
// writes result lines into a directory shared read-write.
func runVng(ctx context.Context, r *vmRun, x *vmtests.Extracted, pkgs []vmtests.Package, bins map[string]string, initBin string,
	plan vmtests.Plan, console, results string, timeout, stall time.Duration, stream io.Writer) (timedOut bool, cpu time.Duration, err error) {
	vng, err := exec.LookPath("vng")
	if err != nil {
		return false, 0, errors.New("RUNNER=vng needs virtme-ng: see vmtests/README.md")
	}
	dir := filepath.Dir(results)
	plan.BinDir = filepath.Dir(initBin) // the test binaries are built next to the init
	plan.SrcDir = r.repo
	plan.Results = results
	_ = os.Remove(results)
	b, err := json.Marshal(plan)
	if err != nil {
		return false, 0, err
	}
	planPath := filepath.Join(dir, "plan.json")
	if err := os.WriteFile(planPath, b, 0o644); err != nil {
		return false, 0, err
	}

	args := []string{"--run", filepath.Join(x.Root, "boot", "vmlinuz-"+x.Release),
		"--cpus", strconv.Itoa(r.cpus), "--memory", strconv.Itoa(r.mem) + "M",
		"--rwdir", dir, "--verbose",
		"--force-9p", // else vng tries virtiofsd first, which may be installed but fail
		"--exec", initBin + " -plan " + planPath}
	if r.accel != "kvm" {
		args = append(args, "--disable-kvm")
	}
	if r.appendArgs != "" {
		args = append(args, "--append", r.appendArgs)
	}
	con, err := os.Create(console)
	if err != nil {
		return false, 0, err
	}
	defer con.Close()
	// Always a pipe, never the file itself: the child may reopen its stdout through
	// /proc/self/fd/1 (vng does), which would start writing at offset 0 again.
	out := io.MultiWriter(con)
	if stream != nil {
		out = io.MultiWriter(con, stream)
	}
	fmt.Fprintf(con, "# vng %q\n", args)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var stalled atomic.Bool
	go vmtests.WatchStall(ctx, results, stall, func() { stalled.Store(true); cancel() })
	cmd := exec.CommandContext(ctx, vng, args...)
	// vng checks that a --rwdir exists in the guest with a path relative to the root but
	// tests it relative to its working directory: run it from / so that check holds.
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = out, out
	// vng is python running qemu: kill the whole process group at the deadline.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run()
	if cmd.ProcessState != nil {
		cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || stalled.Load() {
		return true, cpu, nil
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		return false, cpu, fmt.Errorf("vng: %w", err)
	}
	return false, cpu, nil
}
