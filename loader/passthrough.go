package loader

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
)

// inboundPassthrough6 is the source the proxy binds to hand inbound IPv6 connections to
// the app (Istio's ::6, 127.0.0.6's twin). Unlike 127.0.0.6, which 127.0.0.0/8 on lo
// covers, it is no address of a pod until someone adds it: istio-iptables runs
// `ip -6 addr add ::6/128 dev lo` whenever it writes ip6tables rules, and Attach does the
// same when it captures IPv6. Like istio's cleanup, Detach leaves it: it is an address the
// proxy may still be using, not capture.
var inboundPassthrough6 = netip.MustParseAddr("::6")

// addPassthrough6 puts ::6/128 on lo in the network namespace at netnsPath unless it is
// there, and reports whether it added it (an attach that fails afterwards takes it away).
func addPassthrough6(netnsPath string) (added bool, err error) {
	err = nsexec.Do(netnsPath, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		err = netlink.AddrAdd(lo, passthrough6Addr())
		if errors.Is(err, unix.EEXIST) {
			return nil
		}
		added = err == nil
		return err
	})
	if err != nil {
		return false, &InputError{Field: "netns", Value: netnsPath, Msg: fmt.Sprintf("add the IPv6 inbound passthrough source %s to lo: %v", inboundPassthrough6, err)}
	}
	return added, nil
}

// removePassthrough6 takes away the address addPassthrough6 added.
func removePassthrough6(netnsPath string) error {
	return nsexec.Do(netnsPath, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.AddrDel(lo, passthrough6Addr())
	})
}

func passthrough6Addr() *netlink.Addr {
	// nodad: usable at once (lo does no duplicate address detection anyway).
	return &netlink.Addr{IPNet: &net.IPNet{IP: inboundPassthrough6.AsSlice(), Mask: net.CIDRMask(128, 128)}, Flags: unix.IFA_F_NODAD}
}
