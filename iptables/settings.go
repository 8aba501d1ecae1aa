package iptables

import (
	"net/netip"

	"github.com/meshdivert/divert/policy"
)

// settingsRules adds what istio-iptables writes before everything else: -c's RETURNs in the
// kernel's nat chains (and mangle ones in TPROXY mode), -k's RETURNs inserted at the top of
// nat PREROUTING, and --drop-invalid's mangle rule (istio's Run, in that order).
func settingsRules(rs *ruleSet, cfg *policy.Config) {
	for _, i := range cfg.ExcludeInterfaces {
		rs.decides(tableNat, "PREROUTING", policy.ReasonExcludedInterface, "-i", i, "-j", "RETURN").iface = i
		rs.decides(tableNat, "OUTPUT", policy.ReasonExcludedInterface, "-o", i, "-j", "RETURN").iface = i
	}
	if cfg.Mode == policy.TProxy {
		for _, i := range cfg.ExcludeInterfaces {
			rs.add(tableMangle, "PREROUTING", "-i", i, "-j", "RETURN")
			rs.add(tableMangle, "OUTPUT", "-o", i, "-j", "RETURN")
		}
	}
	for _, i := range cfg.KubeVirtInterfaces {
		r := rs.insert(tableNat, "PREROUTING", 1, "-i", i, "-j", "RETURN")
		r.reason, r.iface = policy.ReasonVirtualInterfaceNotIncluded, i
	}
	if cfg.DropInvalid {
		// After NAT, a packet conntrack finds INVALID (out of window, say) is not
		// translated: it would reach the app's port, which answers with a reset.
		rs.add(tableMangle, "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", chainDrop)
		rs.add(tableMangle, chainDrop, "-j", "DROP")
	}
}

// virtualRedirects inserts, above everything in nat PREROUTING, the capture of -k's
// interfaces as outbound: all their TCP with -i '*', else that to p.
func virtualRedirects(rs *ruleSet, cfg *policy.Config, p netip.Prefix) {
	for _, i := range cfg.KubeVirtInterfaces {
		spec := []string{"-i", i, "-j", chainRedirect}
		if p.IsValid() {
			spec = []string{"-i", i, "-d", p.String(), "-j", chainRedirect}
		}
		r := rs.insert(tableNat, "PREROUTING", 1, spec...)
		r.reason, r.iface, r.prefix = policy.ReasonVirtualInterface, i, p
	}
}

// ownerGroupRules adds istio's owner-group rule after the proxy's own: one rule that
// returns every group but the listed ones, or one RETURN per excluded group.
func ownerGroupRules(rs *ruleSet, cfg *policy.Config) {
	only, gids := cfg.OwnerGroupFilter()
	if !only {
		for _, g := range gids {
			rs.decides(tableNat, chainOutput, policy.ReasonOwnerGroupExcluded,
				"-m", "owner", "--gid-owner", u32(g), "-j", "RETURN").gid = u32(g)
		}
		return
	}
	var spec []string
	for _, g := range gids {
		spec = append(spec, "-m", "owner", "!", "--gid-owner", u32(g))
	}
	rs.decides(tableNat, chainOutput, policy.ReasonOwnerGroupNotIncluded, append(spec, "-j", "RETURN")...)
}
