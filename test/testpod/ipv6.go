package testpod

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/meshdivert/divert/internal/nsexec"
)

// IPv6 addressing mirrors the IPv4 plan inside fd00::/8 (unique local addresses, RFC 4193,
// never routed on the Internet): pod k gets fd00:18:0:k::2/64 on eth0 and the remote end of
// its veth is fd00:18:0:k::1, the pod's IPv6 default gateway. The remote netns owns, on its
// lo, PrimaryAddr6 and four CIDR-test addresses fd00:19:0:X::1, fd00:19:0:X:4000::1,
// fd00:19:0:X:8000::1 and fd00:19:0:X:c000::1 (one in each /66 of fd00:19:0:X::/64, as the
// IPv4 ones sit in each /26 of 198.19.X.0/24).

// Stack is the address families a pod has.
type Stack int

const (
	// IPv4Only is the default pod: 198.18.k.2 on eth0, nothing IPv6 configured but lo's ::1.
	IPv4Only Stack = iota
	// DualStack adds fd00:18:0:k::2/64 on eth0 and an IPv6 default route.
	DualStack
	// IPv6Only has only fd00:18:0:k::2 on eth0 (lo still has 127.0.0.1 and ::1).
	IPv6Only
)

func (s Stack) String() string {
	switch s {
	case IPv4Only:
		return "ipv4"
	case DualStack:
		return "dual-stack"
	case IPv6Only:
		return "ipv6"
	}
	return "stack?"
}

// PrimaryAddr6 is the remote netns's first IPv6 address (Network.Addrs6[0]), the usual
// "outside" IPv6 destination for pod clients.
var PrimaryAddr6 = netip.MustParseAddr("fd00:18::1")

// ipv6CIDRTest is the /32 holding every network's CIDR-test addresses, routed from the pod
// explicitly as 198.19.0.0/16 is.
var ipv6CIDRTest = netip.MustParsePrefix("fd00:19::/32")

// Addrs returns the pod's eth0 addresses, IPv4 first.
func (p *Pod) Addrs() []netip.Addr {
	var as []netip.Addr
	for _, a := range []netip.Addr{p.Addr, p.Addr6} {
		if a.IsValid() {
			as = append(as, a)
		}
	}
	return as
}

func podAddrs6(k int) (addr, gw netip.Addr) {
	a := [16]byte{0: 0xfd, 2: 0x00, 3: 0x18, 7: byte(k), 15: 2}
	g := a
	g[15] = 1
	return netip.AddrFrom16(a), netip.AddrFrom16(g)
}

// enableIPv6 gives the remote netns its IPv6 addresses and turns on IPv6 forwarding, once.
func (n *Network) enableIPv6(tb testing.TB) {
	tb.Helper()
	n.v6mu.Lock()
	defer n.v6mu.Unlock()
	if len(n.Addrs6) > 0 {
		return
	}
	addrs := []netip.Addr{PrimaryAddr6}
	for _, hi := range []byte{0x00, 0x40, 0x80, 0xc0} {
		addrs = append(addrs, netip.AddrFrom16([16]byte{0: 0xfd, 3: 0x19, 7: n.x, 8: hi, 15: 1}))
	}
	h := handle(tb, n.NetNSPath)
	lo, err := h.LinkByName("lo")
	must(tb, err, "find remote lo")
	for _, a := range addrs {
		addAddr(tb, h, lo, netip.PrefixFrom(a, 128))
	}
	// all/forwarding also sets default/forwarding, so veths added later forward too.
	must(tb, nsexec.Do(n.NetNSPath, func() error {
		return errors.Join(noDAD(),
			os.WriteFile("/proc/sys/net/ipv6/conf/all/forwarding", []byte("1\n"), 0))
	}), "enable IPv6 forwarding in remote netns")
	n.Addrs6 = addrs
}

// noDAD turns duplicate address detection off for the interfaces the calling thread's netns
// gets from now on, link-local addresses included: while a veth's link-local address is
// tentative (a second or two after it comes up) the first SYN-ACK routed through the remote
// is lost, seen as a 1-2 s stall on the first pod-to-pod IPv6 connection.
func noDAD() error {
	var errs []error
	for _, c := range []string{"all", "default"} {
		errs = append(errs, os.WriteFile("/proc/sys/net/ipv6/conf/"+c+"/accept_dad", []byte("0\n"), 0))
	}
	return errors.Join(errs...)
}

// addIPv6 puts the pod's and the gateway's IPv6 addresses on the veth and routes the pod's
// IPv6 traffic through the gateway.
func addIPv6(tb testing.TB, pod, remote *netlink.Handle, eth0, peer netlink.Link, p *Pod) {
	tb.Helper()
	addAddr(tb, remote, peer, netip.PrefixFrom(p.Gateway6, 64))
	addAddr(tb, pod, eth0, netip.PrefixFrom(p.Addr6, 64))
	gw := p.Gateway6.AsSlice()
	def := &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	must(tb, pod.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: def, Gw: gw}), "add IPv6 default route")
	cidr := &net.IPNet{IP: ipv6CIDRTest.Addr().AsSlice(), Mask: net.CIDRMask(ipv6CIDRTest.Bits(), 128)}
	must(tb, pod.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: cidr, Gw: gw}), "add "+ipv6CIDRTest.String()+" route")
}
