package iptables

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/policy"
)

// tproxyRoute is istio's TPROXY policy routing: packets marked by ISTIO_DIVERT / TPROXY
// are looked up in their own table, which delivers everything locally through lo. istio
// sets it up for IPv6 too when it writes IPv6 rules.
//
//	ip rule add fwmark <mark> lookup <table>
//	ip route add local 0.0.0.0/0 dev lo table <table>
//	ip -6 rule add fwmark <mark> lookup <table>
//	ip -6 route add local ::/0 dev lo table <table>
type tproxyRoute struct {
	mark, table uint32
}

// wantRoute is the policy route family f needs under cfg: only TPROXY mode with some
// inbound capture, in a family istio writes rules for, as istio-iptables sets it up.
func wantRoute(cfg *policy.Config, f policy.Family) *tproxyRoute {
	if cfg.Mode != policy.TProxy || !cfg.CapturesInbound() || (f == policy.IPv6 && !cfg.IPv6) {
		return nil
	}
	return &tproxyRoute{mark: cfg.TProxyMark, table: cfg.TProxyRouteTable}
}

// nlFamily is f as netlink names it.
func nlFamily(f policy.Family) int {
	if f == policy.IPv6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

// defaultDst is f's default route prefix: 0.0.0.0/0 or ::/0.
func defaultDst(f policy.Family) *net.IPNet {
	if f == policy.IPv6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

// syncRoutes makes the netns hold exactly the wanted TPROXY route of family f (none for
// nil): it adds what is missing and removes istio-style routes with another mark or table.
// A rule counts as istio's when it is only "fwmark M lookup T" and table T routes local
// 0.0.0.0/0 (::/0) via lo. undo removes what this call added.
func syncRoutes(netnsPath string, want *tproxyRoute, f policy.Family) (changed bool, undo func() error, err error) {
	undo = func() error { return nil }
	var added []func(h *netlink.Handle) error
	err = withHandle(netnsPath, func(h *netlink.Handle, loIndex int) error {
		rules, err := h.RuleList(nlFamily(f))
		if err != nil {
			return fmt.Errorf("list ip rules (%s) in netns %s: %w", f, netnsPath, err)
		}
		var errs []error
		haveRule := false
		for _, r := range rules {
			if r.Mark == 0 || r.Table <= 0 || r.Src != nil || r.Dst != nil || r.IifName != "" || r.OifName != "" {
				continue
			}
			route, err := localRoute(h, r.Table, loIndex, f)
			if err != nil {
				errs = append(errs, fmt.Errorf("list routes of table %d in netns %s: %w", r.Table, netnsPath, err))
				continue
			}
			if route == nil {
				continue // somebody else's fwmark rule
			}
			if want != nil && r.Mark == want.mark && r.Table == int(want.table) {
				haveRule = true
				continue
			}
			if err := h.RuleDel(&r); err != nil {
				errs = append(errs, fmt.Errorf("remove ip rule fwmark %#x lookup %d in netns %s: %w", r.Mark, r.Table, netnsPath, err))
				continue
			}
			changed = true
			if want == nil || r.Table != int(want.table) {
				if err := h.RouteDel(route); err != nil && !errors.Is(err, unix.ESRCH) {
					errs = append(errs, fmt.Errorf("remove local route of table %d in netns %s: %w", r.Table, netnsPath, err))
				}
			}
		}
		if len(errs) > 0 || want == nil {
			return errors.Join(errs...)
		}

		table := int(want.table)
		route, err := localRoute(h, table, loIndex, f)
		if err != nil {
			return fmt.Errorf("list routes of table %d in netns %s: %w", table, netnsPath, err)
		}
		if route == nil {
			route = &netlink.Route{
				Dst:       defaultDst(f),
				Scope:     netlink.SCOPE_HOST,
				Type:      unix.RTN_LOCAL,
				Table:     table,
				LinkIndex: loIndex,
			}
			if err := h.RouteAdd(route); err != nil {
				return fmt.Errorf("add route local %s dev lo table %d in netns %s: %w", defaultDst(f), table, netnsPath, err)
			}
			changed = true
			added = append(added, func(h *netlink.Handle) error { return h.RouteDel(route) })
		}
		if !haveRule {
			rule := netlink.NewRule()
			rule.Family = nlFamily(f)
			rule.Mark = want.mark
			rule.Table = table
			if err := h.RuleAdd(rule); err != nil {
				return errors.Join(
					fmt.Errorf("add ip rule fwmark %d lookup %d in netns %s: %w", want.mark, table, netnsPath, err),
					undoAll(h, added))
			}
			changed = true
			added = append(added, func(h *netlink.Handle) error { return h.RuleDel(rule) })
		}
		return nil
	})
	if err != nil || len(added) == 0 {
		return changed, undo, err
	}
	undo = func() error {
		return withHandle(netnsPath, func(h *netlink.Handle, _ int) error { return undoAll(h, added) })
	}
	return changed, undo, nil
}

// undoAll runs the undo steps in reverse order.
func undoAll(h *netlink.Handle, steps []func(*netlink.Handle) error) error {
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if err := steps[i](h); err != nil {
			errs = append(errs, fmt.Errorf("undo TPROXY route: %w", err))
		}
	}
	return errors.Join(errs...)
}

// withHandle runs fn with a netlink handle inside the netns at path and lo's index there.
func withHandle(path string, fn func(h *netlink.Handle, loIndex int) error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in netns %s: %w", path, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo in netns %s: %w", path, err)
	}
	return fn(h, lo.Attrs().Index)
}

// localRoute finds "local 0.0.0.0/0 dev lo" (::/0 for IPv6) in table.
func localRoute(h *netlink.Handle, table, loIndex int, f policy.Family) (*netlink.Route, error) {
	routes, err := h.RouteListFiltered(nlFamily(f), &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, err
	}
	for i, r := range routes {
		if r.Type == unix.RTN_LOCAL && r.LinkIndex == loIndex && isDefault(r.Dst) {
			return &routes[i], nil
		}
	}
	return nil, nil
}

// isDefault reports whether dst is 0.0.0.0/0 or ::/0 (netlink reports it as nil or as the
// prefix).
func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0 && dst.IP.IsUnspecified()
}

// passthroughAddr6 is ::6/128, which istio-iptables adds to lo when it writes IPv6 rules
// (ip -6 addr add ::6/128 dev lo): unlike 127.0.0.6, nothing else makes it bindable, and
// the proxy binds it to forward inbound IPv6 connections (the passthrough rules).
func passthroughAddr6() *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: policy.InboundPassthroughSource6.AsSlice(), Mask: net.CIDRMask(128, 128)}}
}

// addPassthrough6 adds ::6/128 to lo unless it is there; undo removes it if this call added
// it. Cleanup leaves it, as istio does: the address alone captures nothing, and a proxy
// captured by eBPF binds it too.
func addPassthrough6(netnsPath string) (changed bool, undo func() error, err error) {
	undo = func() error { return nil }
	err = withHandle(netnsPath, func(h *netlink.Handle, loIndex int) error {
		lo, err := h.LinkByIndex(loIndex)
		if err != nil {
			return err
		}
		addrs, err := h.AddrList(lo, netlink.FAMILY_V6)
		if err != nil {
			return fmt.Errorf("list lo's IPv6 addresses in netns %s: %w", netnsPath, err)
		}
		for _, a := range addrs {
			if a.IP.Equal(policy.InboundPassthroughSource6.AsSlice()) {
				return nil
			}
		}
		if err := h.AddrAdd(lo, passthroughAddr6()); err != nil {
			return fmt.Errorf("add %s to lo in netns %s: %w", policy.InboundPassthroughSource6, netnsPath, err)
		}
		changed = true
		return nil
	})
	if changed {
		undo = func() error {
			return withHandle(netnsPath, func(h *netlink.Handle, loIndex int) error {
				lo, err := h.LinkByIndex(loIndex)
				if err != nil {
					return err
				}
				return h.AddrDel(lo, passthroughAddr6())
			})
		}
	}
	return changed, undo, err
}

// PodAddrs returns the addresses of every interface of the network namespace at netnsPath,
// as istio-iptables reads its pod's (net.InterfaceAddrs) to decide IPv6 capture
// (policy.Config.DecideIPv6).
func PodAddrs(netnsPath string) ([]netip.Addr, error) {
	var out []netip.Addr
	err := withHandle(netnsPath, func(h *netlink.Handle, _ int) error {
		addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list addresses in netns %s: %w", netnsPath, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
		return nil
	})
	return out, err
}

// SyncTProxyRoute gives the network namespace at netnsPath istio's TPROXY policy route of
// family f (fwmark cfg.TProxyMark lookup cfg.TProxyRouteTable, local 0.0.0.0/0 or ::/0 dev
// lo there) when cfg wants one, or, for a nil cfg or one that does not (IPv6: when it does
// not capture IPv6), removes every route of that shape. eBPF mode's TPROXY return path
// uses it too (loader/tproxy.go). undo removes what this call added; changed says whether
// it changed anything.
func SyncTProxyRoute(netnsPath string, cfg *policy.Config, f policy.Family) (changed bool, undo func() error, err error) {
	var want *tproxyRoute
	if cfg != nil {
		want = wantRoute(cfg, f)
	}
	return syncRoutes(netnsPath, want, f)
}
