package testpod

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/sockio"
)

// Shape is how a client's socket connects, for the socket shapes the kernel treats
// specially: each still makes one connect (the hooks run once).
type Shape struct {
	// V4Mapped connects from a dual-stack AF_INET6 socket to ::ffff:<Dst> (bound to
	// ::ffff:<BindSrc>), as Java and other dual-stack runtimes do for IPv4 destinations:
	// IPv4 on the wire, but connect() goes through the IPv6 socket layer.
	V4Mapped bool
	// DualStack connects from that same kind of socket (AF_INET6, IPV6_V6ONLY off) whatever
	// Dst's family: an IPv6 Dst natively, an IPv4 one as V4Mapped does. Without it (and
	// without V4Mapped) an IPv6 Dst is dialled as Go does, from an IPV6_V6ONLY socket.
	DualStack bool
	// MPTCP connects with IPPROTO_MPTCP (Go's Dialer.SetMultipathTCP): the kernel makes
	// the connection through a TCP subflow socket of its own.
	MPTCP bool
	// BindDevice binds the socket to an interface (SO_BINDTODEVICE) before connecting.
	BindDevice string
	// FastOpen connects with sendto(MSG_FASTOPEN) (TCP Fast Open, no data). The SYN
	// carries a cookie if the netns has one cached for the destination (from an earlier
	// TFO connection to a server that gives them out), else asks for one.
	FastOpen bool
	// IOURing connects with an io_uring IORING_OP_CONNECT; IOURingAsync forces it onto an
	// io-wq worker (IOSQE_ASYNC) instead of the submitting thread.
	IOURing, IOURingAsync bool
	// IDs, if set, are the ids the client holds when it makes the socket and when it
	// connects it; the client must be started as root, which it keeps as its saved uid to
	// switch between them.
	IDs *IDSwitch
}

// IDSwitch is who makes a socket and who connects it.
type IDSwitch struct{ Socket, Connect Creds }

// Creds are a process's real and effective ids (the fs ids follow the effective ones).
type Creds struct{ RUID, EUID, RGID, EGID uint32 }

// Same is the ids of a process running as uid and gid alone.
func Same(uid, gid uint32) Creds { return Creds{uid, uid, gid, gid} }

func (c Creds) String() string { return fmt.Sprintf("%d.%d.%d.%d", c.RUID, c.EUID, c.RGID, c.EGID) }

const idsPrefix = "ids="

func parseCreds(s string) (Creds, error) {
	var c Creds
	_, err := fmt.Sscanf(s, "%d.%d.%d.%d", &c.RUID, &c.EUID, &c.RGID, &c.EGID)
	return c, err
}

// become switches the whole process (every thread: Go's setresuid) to c, through root,
// which stays its saved uid.
func become(c Creds) error {
	if err := syscall.Setresuid(0, 0, 0); err != nil {
		return fmt.Errorf("back to root: %w", err)
	}
	if err := syscall.Setresgid(int(c.RGID), int(c.EGID), 0); err != nil {
		return err
	}
	return syscall.Setresuid(int(c.RUID), int(c.EUID), 0)
}

// special reports whether Go's dialer cannot make the connection.
func (s Shape) special() bool { return s != Shape{} }

// Prefixes marking a Target's Shape on the client's command line, in this order.
const (
	v4MappedPrefix  = "v4mapped:"
	dualStackPrefix = "dual:"
	mptcpPrefix     = "mptcp:"
)

var shapePrefixes = []struct {
	prefix string
	field  func(*Shape) *bool
}{
	{mptcpPrefix, func(s *Shape) *bool { return &s.MPTCP }},
	{v4MappedPrefix, func(s *Shape) *bool { return &s.V4Mapped }},
	{dualStackPrefix, func(s *Shape) *bool { return &s.DualStack }},
	{"tfo:", func(s *Shape) *bool { return &s.FastOpen }},
	{"uring:", func(s *Shape) *bool { return &s.IOURing }},
	{"uring-async:", func(s *Shape) *bool { return &s.IOURingAsync }},
}

const devicePrefix = "dev="

func (s Shape) prefix() string {
	var b strings.Builder
	for _, p := range shapePrefixes {
		if *p.field(&s) {
			b.WriteString(p.prefix)
		}
	}
	if s.BindDevice != "" {
		b.WriteString(devicePrefix + s.BindDevice + ":")
	}
	if s.IDs != nil {
		b.WriteString(idsPrefix + s.IDs.Socket.String() + "/" + s.IDs.Connect.String() + ":")
	}
	return b.String()
}

// cutShape parses what prefix wrote, returning the rest.
func cutShape(target string) (Shape, string) {
	var s Shape
	for _, p := range shapePrefixes {
		var ok bool
		if target, ok = strings.CutPrefix(target, p.prefix); ok {
			*p.field(&s) = true
		}
	}
	if rest, ok := strings.CutPrefix(target, devicePrefix); ok {
		s.BindDevice, target, _ = strings.Cut(rest, ":")
	}
	if rest, ok := strings.CutPrefix(target, idsPrefix); ok {
		var ids string
		ids, target, _ = strings.Cut(rest, ":")
		sock, conn, _ := strings.Cut(ids, "/")
		s.IDs = &IDSwitch{}
		s.IDs.Socket, _ = parseCreds(sock) // written by prefix: well formed
		s.IDs.Connect, _ = parseCreds(conn)
	}
	return s, target
}

// connectShaped connects fd (SO_SNDTIMEO set) to sa the way shape says, waiting for the
// outcome until deadline.
func connectShaped(fd int, sa unix.Sockaddr, shape Shape, deadline time.Time) error {
	switch {
	case shape.FastOpen:
		// A blocking sendto(MSG_FASTOPEN) returns once connected (or failed), like connect.
		err := unix.Sendto(fd, nil, unix.MSG_FASTOPEN, sa)
		if errors.Is(err, unix.EINPROGRESS) {
			return os.ErrDeadlineExceeded
		}
		return err
	case shape.IOURing || shape.IOURingAsync:
		if err := unix.SetNonblock(fd, true); err != nil {
			return err
		}
		err := uringConnect(fd, sa, shape.IOURingAsync)
		if err == nil || !errors.Is(err, unix.EINPROGRESS) {
			return err
		}
		return waitConnected(fd, deadline)
	}
	return sockio.ConnectOnce(fd, sa, deadline)
}

// io_uring ABI (include/uapi/linux/io_uring.h), for one IORING_OP_CONNECT.
const (
	ioringOffSQRing     = 0
	ioringOffCQRing     = 0x8000000
	ioringOffSQEs       = 0x10000000
	ioringOpConnect     = 16
	ioringEnterGetevent = 1
	iosqeAsync          = 1 << 4
)

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  struct {
		head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
		resv2                                                           uint64
	}
	cqOff struct {
		head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
		resv2                                                           uint64
	}
}

type uringSQE struct {
	opcode, flags uint8
	ioprio        uint16
	fd            int32
	off, addr     uint64
	len, opFlags  uint32
	userData      uint64
	pad           [3]uint64
}

// uringConnect submits connect(fd, sa) on a new io_uring and returns its completion's
// result: the kernel's connect runs in the io_uring's context (the submitting task, or an
// io-wq worker with async), not in a connect(2) call.
func uringConnect(fd int, sa unix.Sockaddr, async bool) error {
	var p uringParams
	r, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_setup: %w", errno)
	}
	ring := int(r)
	defer unix.Close(ring)
	mmap := func(off int64, size int) ([]byte, error) {
		return unix.Mmap(ring, off, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	}
	sq, err := mmap(ioringOffSQRing, int(p.sqOff.array+p.sqEntries*4))
	if err != nil {
		return err
	}
	defer unix.Munmap(sq)
	cq, err := mmap(ioringOffCQRing, int(p.cqOff.cqes+p.cqEntries*16))
	if err != nil {
		return err
	}
	defer unix.Munmap(cq)
	sqes, err := mmap(ioringOffSQEs, int(p.sqEntries)*int(unsafe.Sizeof(uringSQE{})))
	if err != nil {
		return err
	}
	defer unix.Munmap(sqes)

	raw, err := rawSockaddr(sa)
	if err != nil {
		return err
	}
	sqe := (*uringSQE)(unsafe.Pointer(&sqes[0]))
	*sqe = uringSQE{opcode: ioringOpConnect, fd: int32(fd), addr: uint64(uintptr(unsafe.Pointer(&raw[0]))), off: uint64(len(raw))}
	if async {
		sqe.flags = iosqeAsync
	}
	u32 := func(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	tail := atomic.LoadUint32(u32(sq, p.sqOff.tail))
	*u32(sq, p.sqOff.array+(tail&*u32(sq, p.sqOff.ringMask))*4) = 0
	atomic.StoreUint32(u32(sq, p.sqOff.tail), tail+1)
	for {
		_, _, errno = unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(ring), 1, 1, ioringEnterGetevent, 0, 0)
		if errno != unix.EINTR {
			break
		}
	}
	if errno != 0 {
		return fmt.Errorf("io_uring_enter: %w", errno)
	}
	head := atomic.LoadUint32(u32(cq, p.cqOff.head))
	if head == atomic.LoadUint32(u32(cq, p.cqOff.tail)) {
		return errors.New("io_uring: no completion")
	}
	cqe := p.cqOff.cqes + (head&*u32(cq, p.cqOff.ringMask))*16
	res := int32(*u32(cq, cqe+8))
	atomic.StoreUint32(u32(cq, p.cqOff.head), head+1)
	runtime.KeepAlive(raw) // the kernel read it during io_uring_enter
	if res < 0 {
		return unix.Errno(-res)
	}
	return nil
}

// rawSockaddr is sa as the kernel reads it.
func rawSockaddr(sa unix.Sockaddr) ([]byte, error) {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		raw := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.Addr}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&raw.Port))[:], uint16(a.Port))
		return unsafe.Slice((*byte)(unsafe.Pointer(&raw)), unsafe.Sizeof(raw)), nil
	case *unix.SockaddrInet6:
		raw := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.Addr}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&raw.Port))[:], uint16(a.Port))
		return unsafe.Slice((*byte)(unsafe.Pointer(&raw)), unsafe.Sizeof(raw)), nil
	}
	return nil, fmt.Errorf("io_uring: unsupported address %T", sa)
}

// waitConnected waits for a non-blocking connect's outcome until deadline and makes the
// socket blocking again.
func waitConnected(fd int, deadline time.Time) error {
	if err := sockio.WaitConnected(fd, deadline); err != nil {
		return err
	}
	return unix.SetNonblock(fd, false)
}

// bindDevice applies shape's SO_BINDTODEVICE, if any.
func bindDevice(fd int, shape Shape) error {
	if shape.BindDevice == "" {
		return nil
	}
	return unix.BindToDevice(fd, shape.BindDevice)
}
