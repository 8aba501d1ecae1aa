package iptables

import (
	"github.com/meshdivert/divert/policy"
)

// MatchingRule returns the rule line, as Render writes it, that decides conn according to
// the reason policy.Decide gives; "" when the connection falls off the end of the chains
// (not included, or no rule for it). `divert explain` prints it beside the eBPF reason.
//
// The rule is one of the family's that decides conn (ip6tables' for native IPv6). The line
// is the first rendered rule for that reason that applies to the connection's
// port or destination (the -o, -d, -b, -q, -x and -i lists render one rule per entry).
// When the model names a reason for which istio renders no rule with these settings, the
// answer is "" too; the parity suite, not this function, judges who is right.
func MatchingRule(cfg *policy.Config, conn policy.Conn) string {
	// istio's rules know no transparent passthrough (Config.TransparentPassthrough): for
	// them a connection from a foreign source is like any other.
	conn.SrcForeign = false
	v := cfg.Decide(conn)
	if v.Reason == policy.ReasonNone {
		return ""
	}
	dst := conn.Routed().Dst.Addr().Unmap()
	for _, r := range rules(cfg, policy.FamilyOf(dst)) {
		if r.reason != v.Reason {
			continue
		}
		if r.port != 0 && r.port != conn.Dst.Port() {
			continue
		}
		if r.gidOwner == (conn.UID == cfg.ProxyUID) && r.reason == policy.ReasonProxyHairpin {
			continue // the uid rule decides the proxy uid's connections, the gid one the rest
		}
		if r.proto != "" && r.proto != conn.Proto.String() {
			continue
		}
		if r.prefix.IsValid() && !r.prefix.Contains(dst) {
			continue
		}
		if r.gid != "" && r.gid != u32(conn.GID) {
			continue
		}
		if r.iface != "" && !matchesIface(r, conn) {
			continue
		}
		return r.line()
	}
	return ""
}

// matchesIface reports whether an interface rule sees conn: -o rules (OUTPUT) outbound
// connections leaving through their interface, -i rules (PREROUTING) inbound ones arriving.
func matchesIface(r rule, conn policy.Conn) bool {
	if conn.Direction == policy.Outbound {
		return r.chain == "OUTPUT" && r.iface == conn.OutIface()
	}
	return r.chain == "PREROUTING" && r.iface == conn.Iface
}
