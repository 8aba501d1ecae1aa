// Command init is PID 1 of a vmtests guest: it prepares a minimal system, runs each test
// binary of the Plan with a timeout, reports one result line per binary on the second serial
// port and powers the machine off. Anything that goes wrong here ends in a missing result
// line (a panic of PID 1 panics the kernel, and qemu runs with -no-reboot), which the host
// counts as a failure.
//
// The same binary is installed as /sbin/modprobe: the kernel calls that to autoload a module
// we did not preload, and we log the request so a missing module shows up by name.
//
// Under virtme-ng (RUNNER=vng) it is not PID 1 but a command run by vng's own init, as
// "init -plan <file>": the system is already up, modules autoload from the kernel package,
// and result lines go to the file the plan names.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/vmtests"
)

func main() {
	switch {
	case filepath.Base(os.Args[0]) == "modprobe":
		modprobe()
	case len(os.Args) == 3 && os.Args[1] == "-plan":
		if !run(os.Args[2], false) {
			os.Exit(1)
		}
	case os.Getpid() == 1:
		run(vmtests.PlanPath, true)
		unix.Sync()
		// Power off; should it fail, returning from PID 1 panics the kernel, and with
		// panic=-1 and qemu's -no-reboot that also ends the VM.
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	default:
		fmt.Fprintln(os.Stderr, "vmtests init: runs as PID 1 in a vmtests guest, or as: init -plan <file>")
		os.Exit(2)
	}
}

// modprobe logs the kernel's request_module calls; it runs with no stdio.
func modprobe() {
	// Mounting bpffs always asks for bpf_preload, which Debian does not build.
	if slices.Contains(os.Args, "bpf_preload") {
		os.Exit(1)
	}
	if f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		// <3>: KERN_ERR, so that it shows on a "quiet" console.
		fmt.Fprintf(f, "<3>vmtest: modprobe %s: module not preloaded (add it to vmtests' module list)\n", strings.Join(os.Args[1:], " "))
	}
	os.Exit(1)
}

// run does everything and reports whether the plan ran to its end. It logs and returns
// on errors, so that PID 1 always powers off.
func run(planPath string, pid1 bool) bool {
	if pid1 {
		mountAll()
		// The kernel opened /dev/console for us only if the initramfs has the node; reopen
		// it from devtmpfs so stdio works either way.
		if con, err := os.OpenFile("/dev/console", os.O_RDWR, 0); err == nil {
			for fd := 0; fd < 3; fd++ {
				_ = unix.Dup3(int(con.Fd()), fd, 0)
			}
		}
	} else {
		mountBPFFS()
	}
	var plan vmtests.Plan
	b, err := os.ReadFile(planPath)
	if err == nil {
		err = json.Unmarshal(b, &plan)
	}
	if err != nil {
		logf("read plan: %v", err)
		return false
	}
	binDir, srcDir, resPath := plan.Dirs()
	res, err := os.OpenFile(resPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOCTTY, 0o644)
	if err != nil {
		logf("open %s: %v (no results will reach the host)", resPath, err)
		return false
	}
	defer res.Close()
	report := func(key string, fields ...string) {
		line := strings.Join(append([]string{key, plan.Token}, fields...), " ")
		fmt.Fprintf(res, "%s\n", line)
		fmt.Fprintf(os.Stdout, "\n%s\n", line) // leading newline: test output may lack one
	}

	var uts unix.Utsname
	_ = unix.Uname(&uts)
	report(vmtests.KeyKernel, unix.ByteSliceToString(uts.Release[:]))
	if pid1 {
		if err := loUp(); err != nil {
			logf("bring up lo: %v", err)
		}
		// Autoload requests go to our logging modprobe (see main); /sbin/modprobe is the
		// default, but say it.
		_ = os.WriteFile("/proc/sys/kernel/modprobe", []byte("/sbin/modprobe\n"), 0)
		for _, m := range loadModules() {
			report(vmtests.KeyModule, m)
		}
	}

	if plan.MemlockUnlimited {
		inf := &unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}
		if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, inf); err != nil {
			logf("raise RLIMIT_MEMLOCK: %v", err)
		}
	}
	for _, p := range plan.Packages {
		outcome, secs := runTest(plan, p, binDir, srcDir, pid1)
		report(vmtests.KeyResult, p.Path, outcome, strconv.FormatFloat(secs, 'f', 1, 64))
	}
	report(vmtests.KeyDone)
	return true
}

// mountBPFFS mounts bpffs at /sys/fs/bpf unless something already is there (vng mode).
func mountBPFFS() {
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return
	}
	_ = os.MkdirAll("/sys/fs/bpf", 0o700)
	if err := unix.Mount("bpf", "/sys/fs/bpf", "bpf", unix.MS_NOSUID|unix.MS_NODEV, "mode=0700"); err != nil {
		logf("mount bpffs: %v", err)
	}
}

// mountAll mounts what the suites use. The cgroup2 mount point matters: test/testpod finds
// it in /proc/mounts, and divert needs a v2 hierarchy for its cgroup programs.
func mountAll() {
	const nosuid, nodev = unix.MS_NOSUID, unix.MS_NODEV
	for _, m := range []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", "/proc", "proc", nosuid | nodev, ""},
		{"sysfs", "/sys", "sysfs", nosuid | nodev, ""},
		{"devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755"},
		{"tmpfs", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777"},
		{"tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid | nodev, ""},
		{"bpf", "/sys/fs/bpf", "bpf", nosuid | nodev, "mode=0700"},
	} {
		_ = os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			logf("mount %s on %s: %v", m.fstype, m.dst, err)
		}
	}
}

// loUp sets lo up in the initial netns, as any real system has it.
func loUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// loadModules loads ModuleDir's modules in file-name order (the host numbered them so that
// dependencies come first) and returns "<name> <error>" for each that failed.
func loadModules() []string {
	names, _ := filepath.Glob(filepath.Join(vmtests.ModuleDir, "*.ko"))
	sort.Strings(names)
	var failed []string
	for _, n := range names {
		f, err := os.Open(n)
		if err == nil {
			err = unix.FinitModule(int(f.Fd()), "", 0)
			f.Close()
		}
		if err != nil && err != unix.EEXIST {
			mod := strings.TrimSuffix(filepath.Base(n), ".ko")
			if _, after, ok := strings.Cut(mod, "-"); ok {
				mod = after
			}
			failed = append(failed, fmt.Sprintf("%s %s", mod, strings.ReplaceAll(err.Error(), " ", "_")))
		}
	}
	return failed
}

// runTest runs one test binary to completion or timeout and returns its outcome. As PID 1,
// it then kills every other process, so nothing a package left behind meets the next.
func runTest(plan vmtests.Plan, p vmtests.Package, binDir, srcDir string, pid1 bool) (string, float64) {
	timeout := time.Duration(plan.TimeoutSec) * time.Second
	args := []string{filepath.Join(binDir, p.Name+".test"), "-test.v", "-test.count=1",
		"-test.timeout=" + timeout.String()}
	if plan.Run != "" {
		args = append(args, "-test.run="+plan.Run)
	}
	if plan.Skip != "" {
		args = append(args, "-test.skip="+plan.Skip)
	}
	dir := filepath.Join(srcDir, p.Dir)
	_ = os.MkdirAll(dir, 0o755)
	fmt.Printf("\n=== VMTEST %s: %s\n", p.Path, strings.Join(args, " "))
	start := time.Now()
	pid, err := syscall.ForkExec(args[0], args, &syscall.ProcAttr{
		Dir: dir,
		// VMTEST_GUEST tells a test it runs in a vmtests guest (the selftest checks it).
		Env:   []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TMPDIR=/tmp", "VMTEST_GUEST=1"},
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	if err != nil {
		logf("start %s: %v", args[0], err)
		return vmtests.Fail, 0
	}
	// Our own timer backs up -test.timeout, which a wedged binary may never honour.
	var killed atomic.Bool
	hard := time.AfterFunc(timeout+time.Duration(plan.GraceSec)*time.Second, func() {
		killed.Store(true)
		logf("%s: no exit %ds after -test.timeout; killing it", p.Path, plan.GraceSec)
		_ = unix.Kill(-pid, unix.SIGKILL)
	})
	ws := waitFor(pid)
	hard.Stop()
	secs := time.Since(start).Seconds()
	if pid1 {
		killAll()
	} else {
		_ = unix.Kill(-pid, unix.SIGKILL)
	}

	switch {
	case killed.Load() || (!ws.Exited() || ws.ExitStatus() != 0) && time.Since(start) >= timeout:
		return vmtests.Timeout, secs
	case ws.Exited() && ws.ExitStatus() == 0:
		return vmtests.Pass, secs
	}
	return vmtests.Fail, secs
}

// waitFor reaps children (PID 1 inherits every orphan) until pid has exited.
func waitFor(pid int) unix.WaitStatus {
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || got == pid {
			return ws
		}
	}
}

// killAll kills every process but PID 1 and reaps them.
func killAll() {
	_ = unix.Kill(-1, unix.SIGKILL)
	for {
		var ws unix.WaitStatus
		if _, err := unix.Wait4(-1, &ws, 0, nil); err == unix.ECHILD {
			return
		} else if err != nil && err != unix.EINTR {
			return
		}
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "\nvmtest init: "+format+"\n", args...)
}
