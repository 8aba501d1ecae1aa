package loader

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
)

// listenerSlots matches LISTENER_SLOTS in bpf/divert.c: a socket's slot is its cookie
// modulo this, on both sides.
const listenerSlots = 64

// adoptListeners puts sockets that already listen on port in the pod's network namespace
// into the inbound listener map. sockops registers listeners when they call listen(); this
// covers a proxy that was listening before divert was attached (or re-attached). The
// sockets are borrowed from their owners with pidfd_getfd (Linux 5.6), which needs no help
// from the proxy.
func adoptListeners(netnsPath string, port uint16, m *ebpf.Map) (int, error) {
	inodes, err := listeningInodes(netnsPath, port)
	if err != nil || len(inodes) == 0 {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Stat(netnsPath, &st); err != nil {
		return 0, err
	}
	owners, err := socketOwners(st.Ino, inodes)
	if err != nil {
		return 0, err
	}
	adopted := 0
	for _, o := range owners {
		fd, err := borrowFD(o.pid, o.fd)
		if err != nil {
			return adopted, fmt.Errorf("borrow listener fd %d of pid %d: %w (needs Linux 5.6+ and CAP_SYS_PTRACE)", o.fd, o.pid, err)
		}
		cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err == nil {
			err = m.Update(uint32(cookie%listenerSlots), uint64(fd), ebpf.UpdateAny)
		}
		unix.Close(fd)
		if err != nil {
			return adopted, fmt.Errorf("add listener of pid %d to inbound_listeners: %w", o.pid, err)
		}
		adopted++
	}
	return adopted, nil
}

// listeningInodes returns the socket inodes of IPv4 TCP sockets listening on port in the
// network namespace, from its /proc/net/tcp.
func listeningInodes(netnsPath string, port uint16) (map[uint64]bool, error) {
	inodes := map[uint64]bool{}
	err := nsexec.Do(netnsPath, func() error {
		// thread-self: /proc/self/net would show the main thread's namespace, not ours.
		f, err := os.Open("/proc/thread-self/net/tcp")
		if err != nil {
			return err
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" { // 0A: TCP_LISTEN
				continue
			}
			_, hexPort, _ := strings.Cut(fields[1], ":")
			p, err := strconv.ParseUint(hexPort, 16, 16)
			if err != nil || uint16(p) != port {
				continue
			}
			if ino, err := strconv.ParseUint(fields[9], 10, 64); err == nil {
				inodes[ino] = true
			}
		}
		return sc.Err()
	})
	return inodes, err
}

type fdOwner struct{ pid, fd int }

// socketOwners finds, among processes in the network namespace netnsIno, the file
// descriptors that hold the given socket inodes.
func socketOwners(netnsIno uint64, inodes map[uint64]bool) ([]fdOwner, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	want := fmt.Sprintf("net:[%d]", netnsIno)
	var owners []fdOwner
	seen := map[uint64]bool{}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err != nil || ns != want {
			continue
		}
		fdDir := fmt.Sprintf("/proc/%d/fd", pid)
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // the process went away
		}
		for _, f := range fds {
			target, err := os.Readlink(filepath.Join(fdDir, f.Name()))
			if err != nil || !strings.HasPrefix(target, "socket:[") {
				continue
			}
			ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]"), 10, 64)
			if err != nil || !inodes[ino] || seen[ino] {
				continue
			}
			fd, _ := strconv.Atoi(f.Name())
			owners = append(owners, fdOwner{pid, fd})
			seen[ino] = true
		}
	}
	return owners, nil
}

// borrowFD duplicates another process's file descriptor into this one.
func borrowFD(pid, fd int) (int, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(pidfd)
	nfd, err := unix.PidfdGetfd(pidfd, fd, 0)
	if errors.Is(err, unix.ENOSYS) {
		return -1, fmt.Errorf("pidfd_getfd: %w", ebpf.ErrNotSupported)
	}
	return nfd, err
}
