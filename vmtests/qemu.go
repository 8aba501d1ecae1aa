package vmtests

import (
	"context"
	"os"
	"strconv"
	"time"
)

// Qemu describes one guest boot.
type Qemu struct {
	Kernel string // vmlinux (booted through PVH) or bzImage
	Initrd string
	Append string // extra kernel command line
	Accel  string // tcg (default) or kvm
	MemMB  int
	CPUs   int
	// Guest's Console receives the first serial port (kernel and test output), its
	// Results the second (the init's result lines).
	Guest
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
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", accel, "-cpu", model, "-m", strconv.Itoa(q.MemMB), "-smp", strconv.Itoa(q.CPUs),
		"-kernel", q.Kernel, "-initrd", q.Initrd,
		// ttyS0: console on qemu's stdout; ttyS1: results, a file only the init writes to.
		"-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
		"-chardev", "file,id=res,path=" + q.Results, "-serial", "chardev:res",
		"-append", "console=ttyS0,115200 panic=-1 " + q.Append,
	}
	return q.Boot(ctx, "qemu-system-x86_64", args, nil)
}

// WatchStall calls kill once the file at path has not grown for stall, or has stayed empty
// for boot (if boot is set: a guest wedged while booting says so long before one wedged in
// a package), and returns when ctx ends. A zero stall never fires once the file has grown.
func WatchStall(ctx context.Context, path string, boot, stall time.Duration, kill func()) {
	var size int64
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
		limit := stall
		if size == 0 && boot > 0 {
			limit = boot
		}
		if limit == 0 {
			continue
		}
		if time.Since(last) > limit {
			kill()
			return
		}
	}
}
