package testpod

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Link is a second interface of a pod, as Multus adds one: a veth to the pod's Network on a
// subnet of its own, which the interface settings (-c, -k) name.
type Link struct {
	Name string     // in the pod, e.g. net1
	Addr netip.Addr // the pod's address on it
	Peer netip.Addr // the Network's end of it
}

// AddLink adds a veth called name from the pod to its Network, addressed 198.18.255.4k+2/30
// in the pod and .4k+1 in the remote netns (k is the pod's number, so a network's first 62
// pods can have one). Only the connected /30 routes through it.
func (p *Pod) AddLink(tb testing.TB, name string) Link {
	tb.Helper()
	k := int(p.Gateway.As4()[2])
	if k > 62 {
		tb.Fatalf("testpod: AddLink supports pods 1-62, this is pod %d", k)
	}
	l := Link{
		Name: name,
		Addr: netip.AddrFrom4([4]byte{198, 18, 255, byte(4*k + 2)}),
		Peer: netip.AddrFrom4([4]byte{198, 18, 255, byte(4*k + 1)}),
	}
	podNS, err := netns.GetFromPath(p.NetNSPath)
	must(tb, err, "open pod netns")
	defer podNS.Close()
	remote := handle(tb, p.Net.NetNSPath)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: fmt.Sprintf("p%d%s", k, name)},
		PeerName:      name,
		PeerNamespace: netlink.NsFd(podNS),
	}
	must(tb, remote.LinkAdd(veth), "create veth "+name)
	addAddr(tb, remote, linkUp(tb, remote, veth.Name), netip.PrefixFrom(l.Peer, 30))
	addAddr(tb, handle(tb, p.NetNSPath), linkUp(tb, handle(tb, p.NetNSPath), name), netip.PrefixFrom(l.Addr, 30))
	return l
}
