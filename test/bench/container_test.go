package bench

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// containerSpawner starts B5's init runs as a container runtime would as far as the mount
// table goes: from a thread with a mount namespace of its own, in which every nsfs mount
// (the benchmark's pod netns, one per pod under /run/netns) is gone. Whatever reads
// /proc/self/mountinfo in the init container (the cgroup2 mount's lookup; cilium/ebpf's
// search for a BPF token, at a process's first map or program load) then reads a table of
// the host's few dozen other mounts, as a container's own, instead of a line per pod on the
// node: on the host's table the eBPF runs grew with the pod count (1,000 netns mounts cost
// each process several ms) while the iptables ones, which read none, did not. The thread
// stays locked for the life of the process (its children's Pdeathsig).
type containerSpawner struct {
	reqs chan func()
}

func newContainerSpawner() (*containerSpawner, error) {
	c := &containerSpawner{reqs: make(chan func())}
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread is the container's
		ready <- privateMountsWithoutNetns()
		for req := range c.reqs {
			req()
		}
		select {}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return c, nil
}

// privateMountsWithoutNetns gives the calling thread its own mount namespace, private so
// nothing of it reaches the host's, and lazily unmounts every nsfs mount in it.
func privateMountsWithoutNetns() error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	f, err := os.Open("/proc/thread-self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var nsfs []string
	for sc := bufio.NewScanner(f); sc.Scan(); {
		// "id parent maj:min root mountpoint options... - fstype source super-options"
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "nsfs" && len(fields) > 4 {
				nsfs = append(nsfs, fields[4])
			}
		}
	}
	for _, mp := range nsfs {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
			return fmt.Errorf("unmount %s in the init runs' mount namespace: %w", mp, err)
		}
	}
	return nil
}

// start starts cmd from the container thread, in the network namespace open as netnsFD.
func (c *containerSpawner) start(netnsFD int, cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	c.reqs <- func() {
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer home.Close()
		if err := unix.Setns(netnsFD, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter the pod's network namespace: %w", err)
			return
		}
		startErr := cmd.Start()
		if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
			panic(fmt.Sprintf("bench: the init runs' spawner could not leave a pod's network namespace: %v", err)) // it must never fork there again
		}
		errc <- startErr
	}
	return <-errc
}
