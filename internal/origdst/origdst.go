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

// soOriginalDst is SO_ORIGINAL_DST from <linux/netfilter_ipv4.h>.
const soOriginalDst = 80

// Get calls getsockopt(SOL_IP, SO_ORIGINAL_DST) with a 16-byte struct sockaddr_in, as
// proxies do (x/sys/unix has no wrapper for this option, and a hook answering it must see
// exactly the buffer a proxy passes).
func Get(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var orig netip.AddrPort
	if cerr := rc.Control(func(fd uintptr) { orig, err = GetFD(int(fd)) }); cerr != nil {
		return netip.AddrPort{}, cerr
	}
	return orig, err
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
