package testpod

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/sys/unix"
)

// TCPSegment builds an IPv4 TCP segment from src to dst with flags (0x10: ACK), window
// 65535 and options opt (a multiple of 4 bytes), checksummed over the pseudo-header: what
// tests write to a raw socket (the kernel adds the IP header) to reach a connection from
// outside any socket's state.
func TCPSegment(src, dst netip.AddrPort, seq, ack uint32, flags uint8, opt []byte) []byte {
	seg := make([]byte, 20+len(opt))
	binary.BigEndian.PutUint16(seg[0:], src.Port())
	binary.BigEndian.PutUint16(seg[2:], dst.Port())
	binary.BigEndian.PutUint32(seg[4:], seq)
	binary.BigEndian.PutUint32(seg[8:], ack)
	seg[12] = byte(len(seg)/4) << 4 // data offset, in 4-byte words
	seg[13] = flags
	binary.BigEndian.PutUint16(seg[14:], 65535)
	copy(seg[20:], opt)
	s, d := src.Addr().As4(), dst.Addr().As4()
	pseudo := append(append(append([]byte{}, s[:]...), d[:]...), 0, unix.IPPROTO_TCP, byte(len(seg)>>8), byte(len(seg)))
	var sum uint32
	for _, b := range [][]byte{pseudo, seg} {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(seg[16:], ^uint16(sum))
	return seg
}
