package loader

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// raiseMemlock lifts RLIMIT_MEMLOCK, which kernels before 5.11 charge BPF maps and programs
// to (later ones charge the memory cgroup and ignore it). cilium/ebpf's rlimit package does
// this too, but decides whether it must at package init, by creating a map, which also makes
// cilium/ebpf look for a BPF token on every bpffs in /proc/self/mountinfo: every divert
// process paid that before main, 4-9 ms on a node whose mount table lists a thousand netns.
func raiseMemlock() error {
	err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY})
	if !errors.Is(err, unix.EPERM) {
		return err
	}
	// No CAP_SYS_RESOURCE: only a kernel that charges the limit needs it raised.
	var u unix.Utsname
	if unix.Uname(&u) == nil && chargesMemlock(unix.ByteSliceToString(u.Release[:])) {
		return fmt.Errorf("raise RLIMIT_MEMLOCK for BPF maps (kernels before 5.11 need CAP_SYS_RESOURCE): %w", err)
	}
	return nil
}

// chargesMemlock says whether a kernel of this release charges BPF memory to RLIMIT_MEMLOCK
// (before 5.11); a release it cannot read is taken to.
func chargesMemlock(release string) bool {
	var major, minor int
	if _, err := fmt.Sscanf(release, "%d.%d", &major, &minor); err != nil {
		return true
	}
	return major < 5 || major == 5 && minor < 11
}
