package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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
	g := vmtests.Guest{Console: console, Results: results, Timeout: timeout, Stall: stall, BootStall: bootStall, Stream: stream}
	return g.Boot(ctx, vng, args, func(cmd *exec.Cmd) {
		// vng checks that a --rwdir exists in the guest with a path relative to the root
		// but tests it relative to its working directory: run it from / so that holds.
		cmd.Dir = "/"
		// vng is python running qemu: kill the whole process group at the deadline.
		cmd.SysProcAttr.Setpgid = true
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	})
}
