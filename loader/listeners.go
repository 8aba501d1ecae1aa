package loader

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
)

// adoptListeners puts sockets that already listen on port in the pod's network namespace
// into the inbound listener map. sockops registers listeners when they call listen(); this
// covers a proxy that was listening before divert was attached (or re-attached). The
// sockets are borrowed from their owners with pidfd_getfd (Linux 5.6), which needs no help
// from the proxy. The pod's listeners are m's entries from base on (node_listeners: its
// slot's range; a per-pod layout's inbound_listeners: all of it).
func adoptListeners(pod Pod, port uint16, m *ebpf.Map, base uint32) (int, error) {
	inodes, err := listeningInodes(pod.NetNS, port)
	if err != nil || len(inodes) == 0 {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Stat(pod.NetNS, &st); err != nil {
		return 0, err
	}
	owners, err := socketOwners(st.Ino, pod.Cgroup, inodes)
	if err != nil {
		return 0, err
	}
	adopted := 0
	for _, o := range owners {
		fd, err := borrowFD(o.pid, o.fd)
		if err != nil {
			return adopted, fmt.Errorf("borrow listener fd %d of pid %d: %w (needs Linux 5.6+ and CAP_SYS_PTRACE)", o.fd, o.pid, err)
		}
		var slot uint32
		slot, err = listenerSlot(fd, listenerSlots)
		if err == nil {
			err = m.Update(base+slot, uint64(fd), ebpf.UpdateAny)
		}
		unix.Close(fd)
		if err != nil {
			return adopted, fmt.Errorf("add listener of pid %d to the listener map: %w", o.pid, err)
		}
		adopted++
	}
	return adopted, nil
}

// listenerSlot is where sockops puts a listener in the inbound_listeners map of size slots
// (LISTENER_SLOTS in bpf/types.h): its cookie modulo half the map, in the first half for
// an AF_INET socket and in the second for an AF_INET6 one.
func listenerSlot(fd int, slots uint32) (uint32, error) {
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return 0, err
	}
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return 0, err
	}
	half := slots / 2
	slot := uint32(cookie % uint64(half))
	if domain == unix.AF_INET6 {
		slot += half
	}
	return slot, nil
}

// listeningInodes returns the socket inodes of TCP sockets of both families listening on
// port in the network namespace: the listeners its /proc/net/tcp and tcp6 show with state
// 0A and that local port. It asks sock_diag (NETLINK_SOCK_DIAG), which filters by state and port in the
// kernel and, asked for listeners only, walks only the listening hash; reading
// /proc/net/tcp walks every bucket of the host-wide established hash as well (6 ms of CPU
// per attach on an idle 2-core machine). Where the diag modules (inet_diag, tcp_diag)
// cannot be loaded, /proc/net/tcp is read as before.
func listeningInodes(netnsPath string, port uint16) (map[uint64]bool, error) {
	inodes := map[uint64]bool{}
	err := nsexec.Do(netnsPath, func() error {
		err := diagListeners(port, inodes)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.EOPNOTSUPP) {
			clear(inodes)
			err = procNetTCPListeners(port, inodes)
		}
		return err
	})
	return inodes, err
}

// procNetTCPListeners adds the listeners on port that /proc/net/tcp and tcp6 show to
// inodes. It must run on a thread in the network namespace.
func procNetTCPListeners(port uint16, inodes map[uint64]bool) error {
	for _, file := range []string{"tcp", "tcp6"} {
		if err := procNetListeners(file, port, inodes); err != nil {
			return err
		}
	}
	return nil
}

func procNetListeners(file string, port uint16, inodes map[uint64]bool) error {
	// thread-self: /proc/self/net would show the main thread's namespace, not ours.
	f, err := os.Open("/proc/thread-self/net/" + file)
	if errors.Is(err, os.ErrNotExist) && file == "tcp6" {
		return nil // a kernel without IPv6
	}
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
}

// diagListeners adds the listeners on port that sock_diag reports to inodes. It must run
// on a thread in the network namespace: sock_diag answers for the namespace its socket was
// created in.
func diagListeners(port uint16, inodes map[uint64]bool) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := inetDiagListeners(fd, family, port, func(ino uint64) { inodes[ino] = true }); err != nil {
			return err
		}
	}
	return nil
}

// Layouts from <linux/inet_diag.h>.
const (
	sizeofInetDiagReqV2 = 56 // struct inet_diag_req_v2
	sizeofInetDiagMsg   = 72 // struct inet_diag_msg
	inetDiagMsgInode    = 68 // offset of idiag_inode in struct inet_diag_msg
	inetDiagMsgSport    = 4  // offset of id.idiag_sport (big endian)
	tcpListen           = 10 // TCP_LISTEN
)

// inetDiagListeners dumps the TCP sockets of family in state LISTEN with local port port
// over the sock_diag socket fd and calls found with each one's inode.
func inetDiagListeners(fd int, family uint8, port uint16, found func(ino uint64)) error {
	req := make([]byte, unix.SizeofNlMsghdr+sizeofInetDiagReqV2)
	// struct nlmsghdr: len, type, flags, seq, pid
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(req[8:], 1)
	r := req[unix.SizeofNlMsghdr:]
	r[0] = family                                      // sdiag_family
	r[1] = unix.IPPROTO_TCP                            // sdiag_protocol
	binary.NativeEndian.PutUint32(r[4:], 1<<tcpListen) // idiag_states
	// id.idiag_sport: the kernel skips listeners on other ports (and, with only LISTEN
	// asked for, never walks the established hash).
	binary.BigEndian.PutUint16(r[8:], port)
	return diagDump(fd, req, func(d []byte) {
		if len(d) < sizeofInetDiagMsg || d[1] != tcpListen || binary.BigEndian.Uint16(d[inetDiagMsgSport:]) != port {
			return // the kernel filtered already; this only guards the layout
		}
		found(uint64(binary.NativeEndian.Uint32(d[inetDiagMsgInode:])))
	})
}

// diagDump sends a sock_diag dump request on fd and calls each with every answered
// socket's message (struct inet_diag_msg and its attributes), until the dump is done.
func diagDump(fd int, req []byte, each func(data []byte)) error {
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sock_diag request: %w", err)
	}
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("sock_diag answer: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return fmt.Errorf("sock_diag answer: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := -int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
						return fmt.Errorf("sock_diag: %w", unix.Errno(errno))
					}
				}
				return nil // an ack
			case unix.SOCK_DIAG_BY_FAMILY:
				each(m.Data)
			}
		}
	}
}

type fdOwner struct{ pid, fd int }

// socketOwners finds, among processes in the network namespace netnsIno, a file
// descriptor for each of the given socket inodes. The processes of the pod's cgroup (at or
// below it) are searched first, as that is where the proxy runs; the rest of /proc, which
// on a node holds every process of every pod, only for sockets not found there.
func socketOwners(netnsIno uint64, cgroup string, inodes map[uint64]bool) ([]fdOwner, error) {
	want := fmt.Sprintf("net:[%d]", netnsIno)
	var owners []fdOwner
	seen := map[uint64]bool{}
	search := func(pid int) {
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err != nil || ns != want {
			return
		}
		fdDir := fmt.Sprintf("/proc/%d/fd", pid)
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			return // the process went away
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
	for _, pid := range cgroupPIDs(cgroup) {
		search(pid)
	}
	if len(seen) == len(inodes) {
		return owners, nil
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	for _, p := range procs {
		if pid, err := strconv.Atoi(p.Name()); err == nil {
			search(pid)
		}
	}
	return owners, nil
}

// cgroupPIDs lists the processes in the cgroup v2 directory dir and its descendants, as
// far as they can be read: it only orders the search of socketOwners, which falls back to
// all of /proc.
func cgroupPIDs(dir string) []int {
	var pids []int
	filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		procs, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, line := range strings.Fields(string(procs)) {
			if pid, err := strconv.Atoi(line); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
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
