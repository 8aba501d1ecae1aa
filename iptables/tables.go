package iptables

import (
	"bytes"
	endian "encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
)

// anyTables says whether the network namespace at path holds any iptables or nftables
// table. A fresh pod's holds none, and then no iptables-save need run to look for istio's
// rules: four processes, which cost an eBPF init container more CPU than its attach.
// Legacy tables are the ones /proc/net/ip{,6}_tables_names list for the namespace (a
// kernel that instantiates them in every namespace lists them all, and the dumps decide);
// nftables ones, iptables-nft's among them, come from an nfnetlink dump. Any error says
// yes: the dumps decide then too.
func anyTables(path string) bool {
	found := true
	_ = nsexec.Do(path, func() error {
		for _, f := range []string{"/proc/thread-self/net/ip_tables_names", "/proc/thread-self/net/ip6_tables_names"} {
			b, err := os.ReadFile(f)
			if err != nil && !errors.Is(err, os.ErrNotExist) || len(bytes.TrimSpace(b)) > 0 {
				return nil // no module loaded: no file, no table
			}
		}
		n, err := nftTables()
		found = err != nil || n > 0
		return nil
	})
	return found
}

// nftTables counts the nftables tables of every family in the calling thread's network
// namespace.
func nftTables() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	// struct nlmsghdr, then struct nfgenmsg: family AF_UNSPEC (all), NFNETLINK_V0, res_id 0.
	req := make([]byte, unix.NLMSG_HDRLEN+4)
	endian.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	endian.NativeEndian.PutUint16(req[4:], unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETTABLE)
	endian.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	endian.NativeEndian.PutUint32(req[8:], 1) // sequence number
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("nfnetlink: list tables: %w", err)
	}
	tables := 0
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("nfnetlink: list tables: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return 0, fmt.Errorf("nfnetlink: list tables: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return tables, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := -int32(endian.NativeEndian.Uint32(m.Data)); errno != 0 {
						return 0, fmt.Errorf("nfnetlink: list tables: %w", syscall.Errno(errno))
					}
				}
				return tables, nil
			case unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWTABLE:
				tables++
			}
		}
	}
}
