// Package origdst reads a redirected connection's original destination exactly as an
// unmodified transparent proxy (Envoy, HAProxy) does, so what the tests and divert
// validate see is what a real proxy would see from divert's getsockopt hook or from
// conntrack.
package origdst

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST from <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST
// (<linux/netfilter_ipv6/ip6_tables.h>) has the same value, at level SOL_IPV6.
const soOriginalDst = 80

// Get asks as Envoy does: a connection whose local address is IPv4 (on a dual-stack socket
// too, where it reads ::ffff:a.b.c.d) with getsockopt(SOL_IP, SO_ORIGINAL_DST) and a
// 16-byte struct sockaddr_in; a native IPv6 one with getsockopt(SOL_IPV6,
// IP6T_SO_ORIGINAL_DST) and a 28-byte struct sockaddr_in6 (x/sys/unix has no wrapper for
// these options, and a hook answering them must see exactly the buffer a proxy passes).
func Get(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	get := GetFD
	if la, ok := c.LocalAddr().(*net.TCPAddr); ok && la.IP.To4() == nil {
		get = GetFD6
	}
	var orig netip.AddrPort
	if cerr := rc.Control(func(fd uintptr) { orig, err = get(int(fd)) }); cerr != nil {
		return netip.AddrPort{}, cerr
	}
	return orig, err
}

// GetFD6 is getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) on a raw socket descriptor.
func GetFD6(fd int) (netip.AddrPort, error) {
	var sa [28]byte // family, port (big endian), flowinfo, address, scope id
	size := uint32(len(sa))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_IPV6, soOriginalDst,
		uintptr(unsafe.Pointer(&sa[0])), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	if family := binary.NativeEndian.Uint16(sa[0:2]); family != unix.AF_INET6 || size < 24 {
		return netip.AddrPort{}, fmt.Errorf("IP6T_SO_ORIGINAL_DST answered family %d, length %d", family, size)
	}
	return netip.AddrPortFrom(netip.AddrFrom16([16]byte(sa[8:24])), binary.BigEndian.Uint16(sa[2:4])), nil
}

// GetFD is Get on a raw socket descriptor.
func GetFD(fd int) (netip.AddrPort, error) {
	var sa [16]byte // family, port (big endian), address, zero padding
	size := uint32(len(sa))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_IP, soOriginalDst,
		uintptr(unsafe.Pointer(&sa[0])), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	if family := binary.NativeEndian.Uint16(sa[0:2]); family != unix.AF_INET || size < 8 {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST answered family %d, length %d", family, size)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(sa[4:8])), binary.BigEndian.Uint16(sa[2:4])), nil
}
