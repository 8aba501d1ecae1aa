package policy

import (
	"net/netip"
	"slices"
)

// The rules below are the ones more than one rendering needs: Decide (the model), maps
// (what the BPF programs read) and iptables (istio's rules) all ask these methods, so a
// rule is written once, here. A new setting adds a method and three uses.

// CapturesLoopback reports whether -i names a loopback range (v4 or v6), which makes istio
// drop its rules that let every local destination pass.
func (c *Config) CapturesLoopback() bool {
	for _, p := range c.OutboundCIDRs.Prefixes {
		if p.Addr().IsLoopback() {
			return true
		}
	}
	return false
}

// CapturesInbound reports whether any inbound port is captured: -b "" captures none, and
// istio then writes no inbound rule at all (not even the PREROUTING jump, nor in TPROXY
// mode the policy route).
func (c *Config) CapturesInbound() bool { return c.InboundPorts.All || len(c.InboundPorts.Ports) > 0 }

// InboundExcludes is -d as it applies: only with -b '*' (istio renders it only then); with
// a -b list, the list alone decides and -d is ignored.
func (c *Config) InboundExcludes() []uint16 {
	if !c.InboundPorts.All {
		return nil
	}
	return c.InboundExcludePorts
}

// InboundTunnelPasses reports whether the tunnel port (-e) passes inbound. istio returns it
// only in the nat ISTIO_INBOUND chain, which TPROXY mode does not use: there the tunnel port
// is captured like any other.
func (c *Config) InboundTunnelPasses() bool { return c.Mode != TProxy }

// TransparentPassthrough reports whether a connection to the pod from a source that is not
// the pod's (Conn.SrcForeign) passes like one from 127.0.0.6: in TPROXY mode the proxy
// forwards an inbound connection from the client's own address (Envoy's original_src,
// IP_TRANSPARENT and the TPROXY mark), and the app must get it. istio's mangle rules let it
// pass ("-o lo -m mark --mark 1337 -j RETURN"), but its nat hairpin catches it first and the
// connection never completes: here divert differs from istio's rules on purpose
// (docs/semantics.md). The programs read it as !InboundTunnelPasses (both are TPROXY mode).
func (c *Config) TransparentPassthrough() bool { return c.Mode == TProxy }

// SrcForeign reports whether src is a bound source that is not an address of the pod
// (Conn.SrcForeign): not unbound, not unspecified, not loopback, not one of podAddrs.
func SrcForeign(src netip.Addr, podAddrs []netip.Addr) bool {
	return src.IsValid() && !src.Unmap().IsUnspecified() && !DstLocal(src, podAddrs)
}

// DstLocal reports whether dst is a destination of the pod itself, one that routes via lo
// (Conn.DstLocal): all of 127.0.0.0/8 (and ::1), and the pod's own addresses podAddrs.
func DstLocal(dst netip.Addr, podAddrs []netip.Addr) bool {
	d := dst.Unmap()
	return d.IsLoopback() || slices.Contains(podAddrs, d)
}
