package security

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"time"

	"github.com/meshdivert/divert/test/testpod"
	"golang.org/x/sys/unix"
)

// rawHandshake opens a TCP connection by hand from a raw socket in the calling thread's
// netns: a SYN from src to dst, the ACK of the SYN-ACK, then it returns the first data the
// listener sends. The kernel knows nothing of the connection, so something must keep it
// from resetting it (the tests drop RSTs with a filter rule). opt, if any, is carried in
// every segment. With hdrincl the IP header is written by hand too (IP_HDRINCL), naming
// src's address whatever the route would pick.
func rawHandshake(src, dst netip.AddrPort, opt []byte, hdrincl bool) (string, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	if hdrincl {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_HDRINCL, 1); err != nil {
			return "", err
		}
	}
	tv := unix.Timeval{Sec: 1}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	to := &unix.SockaddrInet4{Addr: dst.Addr().As4()}
	send := func(flags uint8, seq, ack uint32) error {
		seg := testpod.TCPSegment(src, dst, seq, ack, flags, opt)
		if hdrincl {
			seg = append(ipHeader(src.Addr(), dst.Addr(), len(seg)), seg...)
		}
		return unix.Sendto(fd, seg, 0, to)
	}
	const isn = 1000
	if err := send(0x02, isn, 0); err != nil { // SYN
		return "", err
	}
	synAcked := false
	buf := make([]byte, 65536)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			continue // timeout: look again until the deadline
		}
		ihl := int(buf[0]&0x0f) * 4
		tcp := buf[ihl:n]
		if len(tcp) < 20 || binary.BigEndian.Uint16(tcp[0:2]) != dst.Port() || binary.BigEndian.Uint16(tcp[2:4]) != src.Port() {
			continue
		}
		flags, doff := tcp[13], int(tcp[12]>>4)*4
		switch {
		case flags&0x04 != 0: // RST
			return "", errors.New("reset by the peer")
		case !synAcked && flags&0x12 == 0x12: // SYN-ACK
			synAcked = true
			if err := send(0x10, isn+1, binary.BigEndian.Uint32(tcp[4:8])+1); err != nil { // ACK
				return "", err
			}
		case synAcked && len(tcp) > doff: // the listener's first data
			return string(tcp[doff:]), nil
		}
	}
	if !synAcked {
		return "", errors.New("no SYN-ACK")
	}
	return "", errors.New("no data after the handshake")
}

// ipHeader is an IPv4 header for a TCP payload of n bytes (the kernel fills the checksum
// and the ID).
func ipHeader(src, dst netip.Addr, n int) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+n))
	h[8], h[9] = 64, unix.IPPROTO_TCP
	s, d := src.As4(), dst.As4()
	copy(h[12:16], s[:])
	copy(h[16:20], d[:])
	return h
}
