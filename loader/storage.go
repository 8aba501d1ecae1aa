package loader

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/internal/nsexec"
)

// OrigDstsHeld counts the sockets of a network namespace that hold an original
// destination in the pod's socket storage: app sockets whose handshake is not over yet,
// and proxy sockets that answer SO_ORIGINAL_DST. The kernel frees the storage with the
// socket, so once the pod's connections are closed both are zero.
type OrigDstsHeld struct {
	App, Proxy int
}

// struct sock_orig_dst's side and its values (bpf/maps.h's enum orig_dst_side).
const (
	sideOffset = int(unsafe.Offsetof(bpf.DivertSockOrigDst{}.Side))
	sideApp    = 1
	sideProxy  = 2
)

// Layouts from <linux/inet_diag.h> and <linux/sock_diag.h>.
const (
	inetDiagReqSkBPFStorages = 2      // INET_DIAG_REQ_SK_BPF_STORAGES (nested)
	skDiagBPFStorageReqMapFD = 1      // SK_DIAG_BPF_STORAGE_REQ_MAP_FD
	inetDiagSkBPFStorages    = 20     // INET_DIAG_SK_BPF_STORAGES (nested)
	skDiagBPFStorage         = 1      // SK_DIAG_BPF_STORAGE (nested)
	skDiagBPFStorageMapValue = 3      // SK_DIAG_BPF_STORAGE_MAP_VALUE
	nlaFNested               = 0x8000 // NLA_F_NESTED
	nlaTypeMask              = 0x3fff
)

// CountOrigDsts asks sock_diag for every TCP socket of the network namespace at netnsPath,
// with its entry in storage (the pod's orig_dst_storage map), and counts them by side.
func CountOrigDsts(netnsPath string, storage *ebpf.Map) (OrigDstsHeld, error) {
	var held OrigDstsHeld
	err := nsexec.Do(netnsPath, func() error {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		if err != nil {
			return fmt.Errorf("sock_diag socket: %w", err)
		}
		defer unix.Close(fd)
		// Dual-stack app sockets dialling v4-mapped destinations are AF_INET6.
		for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
			if err := diagStorages(fd, family, storage.FD(), func(value []byte) {
				if len(value) <= sideOffset {
					return
				}
				switch value[sideOffset] {
				case sideApp:
					held.App++
				case sideProxy:
					held.Proxy++
				}
			}); err != nil {
				return err
			}
		}
		return nil
	})
	return held, err
}

// diagStorages dumps the TCP sockets of one family, in every state, asking for their
// entry in the socket storage map mapFD, and calls found with each entry's value.
func diagStorages(fd int, family uint8, mapFD int, found func(value []byte)) error {
	// nlmsghdr, inet_diag_req_v2, then the nested request attribute with the map's fd.
	req := make([]byte, unix.SizeofNlMsghdr+sizeofInetDiagReqV2+4+8)
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(req[8:], 1)
	r := req[unix.SizeofNlMsghdr:]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(r[4:], ^uint32(0)) // idiag_states: all
	a := r[sizeofInetDiagReqV2:]
	binary.NativeEndian.PutUint16(a[0:], 4+8)
	binary.NativeEndian.PutUint16(a[2:], inetDiagReqSkBPFStorages|nlaFNested)
	binary.NativeEndian.PutUint16(a[4:], 8)
	binary.NativeEndian.PutUint16(a[6:], skDiagBPFStorageReqMapFD)
	binary.NativeEndian.PutUint32(a[8:], uint32(mapFD))
	return diagDump(fd, req, func(d []byte) {
		if len(d) < sizeofInetDiagMsg {
			return
		}
		for _, st := range attrs(d[sizeofInetDiagMsg:], inetDiagSkBPFStorages) {
			for _, one := range attrs(st, skDiagBPFStorage) {
				for _, v := range attrs(one, skDiagBPFStorageMapValue) {
					found(v)
				}
			}
		}
	})
}

// attrs returns the payloads of the netlink attributes of type typ in b.
func attrs(b []byte, typ uint16) [][]byte {
	var out [][]byte
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		t := binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask
		if l < 4 || l > len(b) {
			break
		}
		if t == typ {
			out = append(out, b[4:l])
		}
		next := (l + 3) &^ 3
		if next > len(b) {
			break
		}
		b = b[next:]
	}
	return out
}
