// Package iptables is the iptables backend: it renders a policy.Config as the exact
// iptables-restore input istio-iptables produces (the parity oracle for the eBPF backend),
// applies and removes those rules inside a pod's network namespace, and names the rule that
// decides a connection (for `divert explain`).
//
// What shapes capture is rendered: TCP, DNS capture (nat plus the raw table's conntrack
// zones), owner groups, interfaces (-c, -k) and the INVALID drop, for IPv4 (iptables) and,
// when the pod's IPv6 is captured (policy.Config.IPv6), for IPv6 (ip6tables). Rule order and
// spelling follow istio-iptables (istio/istio tools/istio-iptables/pkg/capture) rule for
// rule, so the kernel running these rules behaves exactly as it does under istio-init.
package iptables

import (
	"net/netip"
	"strconv"
	"strings"

	"github.com/meshdivert/divert/policy"
)

// Tables and chains istio-iptables uses.
const (
	tableNat    = "nat"
	tableMangle = "mangle"
	tableRaw    = "raw"

	chainInbound    = "ISTIO_INBOUND"
	chainRedirect   = "ISTIO_REDIRECT"
	chainInRedirect = "ISTIO_IN_REDIRECT"
	chainOutput     = "ISTIO_OUTPUT"
	chainDivert     = "ISTIO_DIVERT"
	chainTProxy     = "ISTIO_TPROXY"
	chainOutputDNS  = "ISTIO_OUTPUT_DNS"
	chainDrop       = "ISTIO_DROP"

	// chainPrefix marks every chain this package owns; Cleanup removes exactly these.
	chainPrefix = "ISTIO_"
)

// outboundMark is the packet mark istio's TPROXY rules give the proxy's own connections to
// the pod's addresses, so inbound capture can tell them from the app's. istio hard-codes it.
const outboundMark = "1338"

// hostLoopback is the one address the hairpin and "localhost" rules of f leave alone:
// istio's --host-ipv4-loopback-cidr default (policy.Localhost) and ::1/128.
func hostLoopback(f policy.Family) string { return policy.Host(f.Localhost()).String() }

// passthroughSource is where the proxy's inbound passthrough connections of f come from.
func passthroughSource(f policy.Family) string { return policy.Host(f.PassthroughSource()).String() }

// rule is one iptables rule in istio-iptables' order and spelling.
type rule struct {
	table, chain string
	// pos > 0 inserts at that position (-I), as istio does for three mangle rules; 0 appends.
	pos int
	// spec is the match and target, in istio's argument order.
	spec []string
	// reason is the policy verdict this rule decides (ReasonNone for plumbing), with the
	// port or prefix it is specific to, so MatchingRule can pick the right one of a list.
	reason policy.Reason
	port   uint16
	prefix netip.Prefix
	// proto is the protocol a deciding rule is specific to ("-p udp"); MatchingRule skips
	// it for the other. Unset for rules that match any protocol or only ever see TCP.
	proto string
	// gidOwner marks the gid twin of a uid rule with the same reason: it decides only
	// connections of the proxy gid that are not the proxy uid's.
	gidOwner bool
	// family is whose rules these are (iptables' or ip6tables').
	family policy.Family
	// iface and gid are the interface (-c, -k) or owner group a deciding rule is specific to.
	iface, gid string
}

// line is the rule as istio writes it into the restore input.
func (r rule) line() string {
	head := "-A " + r.chain
	if r.pos > 0 {
		head = "-I " + r.chain + " " + strconv.Itoa(r.pos)
	}
	return head + " " + strings.Join(r.spec, " ")
}

// builtin reports whether chain is one of the kernel's; all others are istio's own.
func builtin(chain string) bool { return !strings.HasPrefix(chain, chainPrefix) }

// target returns the rule's -j target.
func (r rule) target() string {
	for i, a := range r.spec {
		if a == "-j" && i+1 < len(r.spec) {
			return r.spec[i+1]
		}
	}
	return ""
}

type ruleSet []rule

func (rs *ruleSet) add(table, chain string, spec ...string) *rule {
	*rs = append(*rs, rule{table: table, chain: chain, spec: spec})
	return &(*rs)[len(*rs)-1]
}

func (rs *ruleSet) insert(table, chain string, pos int, spec ...string) *rule {
	*rs = append(*rs, rule{table: table, chain: chain, pos: pos, spec: spec})
	return &(*rs)[len(*rs)-1]
}

func (rs *ruleSet) decides(table, chain string, reason policy.Reason, spec ...string) *rule {
	r := rs.add(table, chain, spec...)
	r.reason = reason
	return r
}

func u16(v uint16) string { return strconv.FormatUint(uint64(v), 10) }
func u32(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

// rules builds istio-iptables' rules of family f for cfg, in the order istio appends them.
// Both families get the same rules but for their addresses: -i and -x ranges, nameservers,
// the passthrough source and localhost (istio's AppendVersionedRule, AppendRuleV4/V6).
func rules(cfg *policy.Config, f policy.Family) ruleSet {
	var rs ruleSet
	tproxy := cfg.Mode == policy.TProxy
	hostLoopback := hostLoopback(f)
	mark := u32(cfg.TProxyMark)
	tunnel := u16(cfg.InboundTunnelPort)

	settingsRules(&rs, cfg)

	// The tunnel port bypasses inbound capture. istio always writes this rule into the nat
	// chain, even in TPROXY mode where nothing jumps to nat ISTIO_INBOUND.
	rs.decides(tableNat, chainInbound, policy.ReasonInboundTunnelPort,
		"-p", "tcp", "--dport", tunnel, "-j", "RETURN").port = cfg.InboundTunnelPort
	rs.add(tableNat, chainRedirect, "-p", "tcp", "-j", "REDIRECT", "--to-ports", u16(cfg.ProxyPort))
	rs.add(tableNat, chainInRedirect, "-p", "tcp", "-j", "REDIRECT", "--to-ports", u16(cfg.InboundCapturePort))

	inboundRules(&rs, cfg, f)

	// Outbound: everything a process of the pod sends goes through ISTIO_OUTPUT.
	rs.add(tableNat, "OUTPUT", "-j", chainOutput)
	// -o comes first so an excluded port escapes even the hairpin; istio returns UDP too.
	for _, p := range cfg.OutboundExcludePorts {
		r := rs.decides(tableNat, chainOutput, policy.ReasonExcludedOutboundPort,
			"-p", "tcp", "--dport", u16(p), "-j", "RETURN")
		r.port, r.proto = p, "tcp"
		r = rs.decides(tableNat, chainOutput, policy.ReasonExcludedOutboundPort,
			"-p", "udp", "--dport", u16(p), "-j", "RETURN")
		r.port, r.proto = p, "udp"
	}
	rs.decides(tableNat, chainOutput, policy.ReasonInboundPassthrough,
		"-o", "lo", "-s", passthroughSource(f), "-j", "RETURN")

	// istio drops the "app talks to itself" RETURN when -i names a loopback prefix, so
	// that loopback traffic can reach the include rules.
	loopbackIncluded := cfg.CapturesLoopback()
	// With DNS capture, port 53 is left out of the uid hairpin and of the "local
	// destination" returns, so queries to a nameserver on the pod reach ISTIO_OUTPUT_DNS.
	dns := cfg.CapturesDNS()
	dnsPort := u16(policy.DNSPort)
	localReturn := func(owner, id string) []string {
		if dns {
			return []string{"-o", "lo", "-p", "tcp", "!", "--dport", dnsPort, "-m", "owner", "!", owner, id, "-j", "RETURN"}
		}
		return []string{"-o", "lo", "-m", "owner", "!", owner, id, "-j", "RETURN"}
	}
	uid := u32(cfg.ProxyUID)
	if dns {
		rs.decides(tableNat, chainOutput, policy.ReasonProxyHairpin,
			"-o", "lo", "!", "-d", hostLoopback, "-p", "tcp", "-m", "multiport", "!", "--dports", dnsPort+","+tunnel,
			"-m", "owner", "--uid-owner", uid, "-j", chainInRedirect)
	} else {
		rs.decides(tableNat, chainOutput, policy.ReasonProxyHairpin,
			"-o", "lo", "!", "-d", hostLoopback, "-p", "tcp", "!", "--dport", tunnel,
			"-m", "owner", "--uid-owner", uid, "-j", chainInRedirect)
	}
	if !loopbackIncluded {
		rs.decides(tableNat, chainOutput, policy.ReasonLocalDestination, localReturn("--uid-owner", uid)...)
	}
	rs.decides(tableNat, chainOutput, policy.ReasonProxyUID, "-m", "owner", "--uid-owner", uid, "-j", "RETURN")
	// The gid twins of the hairpin and local-destination rules: the uid rules before them
	// already matched every connection that leaves through lo, except (with DNS capture) TCP
	// to port 53, which the gid hairpin (istio keeps 53 in it) then takes.
	gid := u32(cfg.ProxyGID)
	rs.decides(tableNat, chainOutput, policy.ReasonProxyHairpin,
		"-o", "lo", "!", "-d", hostLoopback, "-p", "tcp", "!", "--dport", tunnel,
		"-m", "owner", "--gid-owner", gid, "-j", chainInRedirect).gidOwner = true
	if !loopbackIncluded {
		// Never decides: the uid twin returned every such connection but the proxy uid's.
		rs.add(tableNat, chainOutput, localReturn("--gid-owner", gid)...)
	}
	rs.decides(tableNat, chainOutput, policy.ReasonProxyGID, "-m", "owner", "--gid-owner", gid, "-j", "RETURN")
	ownerGroupRules(&rs, cfg)
	if dns {
		dnsRules(&rs, cfg, f)
	}

	rs.decides(tableNat, chainOutput, policy.ReasonLocalhost, "-d", hostLoopback, "-j", "RETURN")
	for _, p := range cfg.OutboundExcludeCIDRsOf(f) {
		rs.decides(tableNat, chainOutput, policy.ReasonExcludedCIDR, "-d", p.String(), "-j", "RETURN").prefix = p
	}
	for _, p := range cfg.OutboundPorts {
		rs.decides(tableNat, chainOutput, policy.ReasonIncludedOutboundPort,
			"-p", "tcp", "--dport", u16(p), "-j", chainRedirect).port = p
	}
	switch {
	case cfg.OutboundCIDRs.All:
		rs.decides(tableNat, chainOutput, policy.ReasonIncludedCIDR, "-j", chainRedirect)
		virtualRedirects(&rs, cfg, netip.Prefix{})
	default:
		for _, p := range cfg.OutboundCIDRsOf(f) {
			virtualRedirects(&rs, cfg, p)
			rs.decides(tableNat, chainOutput, policy.ReasonIncludedCIDR, "-d", p.String(), "-j", chainRedirect).prefix = p
		}
	}

	if tproxy {
		// Keep the mark of connections the proxy accepted through TPROXY on their replies,
		// and mark the proxy's own connections to the pod (1338) so inbound capture skips
		// everything else arriving on lo.
		rs.add(tableMangle, "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark")
		rs.add(tableMangle, "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
		rs.add(tableMangle, "OUTPUT", "!", "-d", hostLoopback, "-p", "tcp", "-o", "lo",
			"-m", "owner", "--uid-owner", uid, "-j", "MARK", "--set-mark", outboundMark)
		rs.add(tableMangle, "OUTPUT", "!", "-d", hostLoopback, "-p", "tcp", "-o", "lo",
			"-m", "owner", "--gid-owner", gid, "-j", "MARK", "--set-mark", outboundMark)
		rs.add(tableMangle, "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK", "--restore-mark")
		rs.insert(tableMangle, chainInbound, 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN")
		rs.insert(tableMangle, chainInbound, 2, "-p", "tcp", "-s", passthroughSource(f), "-i", "lo", "-j", "RETURN")
		rs.insert(tableMangle, chainInbound, 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", outboundMark, "-j", "RETURN")
	}
	for i := range rs {
		rs[i].family = f
	}
	return rs
}

// dnsRules adds istio's DNS capture (its SetupDNSRedir) to family f's rules: the nat
// redirects to the agent (TCP then UDP, per nameserver of f or for every destination), and
// the raw table's conntrack zones that keep the agent's upstream queries (zone 1) apart from
// the app's redirected ones (zone 2), so their UDP conntrack entries never clash. istio
// jumps to ISTIO_OUTPUT_DNS from nat, and to the raw ISTIO_INBOUND, only in a family that
// has something to capture (policy.Config.CapturesDNSOf).
func dnsRules(rs *ruleSet, cfg *policy.Config, f policy.Family) {
	dnsPort, agent := u16(policy.DNSPort), u16(policy.DNSAgentPort)
	servers := cfg.DNSServersOf(f)
	rs.add(tableRaw, "OUTPUT", "-j", chainOutputDNS)
	if cfg.CapturesDNSOf(f) {
		rs.add(tableNat, chainOutput, "-j", chainOutputDNS)
	}
	// istio spells the TCP target --to-ports and the UDP one --to-port.
	for _, p := range []struct{ proto, toPorts string }{{"tcp", "--to-ports"}, {"udp", "--to-port"}} {
		if cfg.CaptureAllDNS {
			rs.decides(tableNat, chainOutputDNS, policy.ReasonDNSCaptured,
				"-p", p.proto, "--dport", dnsPort, "-j", "REDIRECT", p.toPorts, agent).proto = p.proto
			continue
		}
		for _, ns := range servers {
			r := rs.decides(tableNat, chainOutputDNS, policy.ReasonDNSCaptured,
				"-p", p.proto, "--dport", dnsPort, "-d", policy.Host(ns).String(), "-j", "REDIRECT", p.toPorts, agent)
			r.proto, r.prefix = p.proto, policy.Host(ns)
		}
	}
	for _, owner := range []struct{ match, id string }{{"--uid-owner", u32(cfg.ProxyUID)}, {"--gid-owner", u32(cfg.ProxyGID)}} {
		rs.add(tableRaw, chainOutputDNS, "-p", "udp", "--dport", dnsPort, "-m", "owner", owner.match, owner.id, "-j", "CT", "--zone", "1")
		rs.add(tableRaw, chainOutputDNS, "-p", "udp", "--sport", agent, "-m", "owner", owner.match, owner.id, "-j", "CT", "--zone", "2")
	}
	if cfg.CaptureAllDNS {
		rs.add(tableRaw, "PREROUTING", "-j", chainInbound)
		rs.add(tableRaw, chainOutputDNS, "-p", "udp", "--dport", dnsPort, "-j", "CT", "--zone", "2")
		rs.add(tableRaw, chainInbound, "-p", "udp", "--sport", dnsPort, "-j", "CT", "--zone", "1")
		return
	}
	if len(servers) > 0 {
		rs.add(tableRaw, "PREROUTING", "-j", chainInbound)
	}
	for _, ns := range servers {
		rs.add(tableRaw, chainOutputDNS, "-p", "udp", "--dport", dnsPort, "-d", policy.Host(ns).String(), "-j", "CT", "--zone", "2")
		rs.add(tableRaw, chainInbound, "-p", "udp", "--sport", dnsPort, "-s", policy.Host(ns).String(), "-j", "CT", "--zone", "1")
	}
}

// inboundRules adds the capture of connections arriving from outside: nat REDIRECT, or
// mangle TPROXY (which keeps the original destination and source).
func inboundRules(rs *ruleSet, cfg *policy.Config, f policy.Family) {
	if !cfg.CapturesInbound() {
		return // -b "": no inbound capture at all, not even the PREROUTING jump
	}
	table, capture := tableNat, chainInRedirect
	if cfg.Mode == policy.TProxy {
		table, capture = tableMangle, chainTProxy
		mark := u32(cfg.TProxyMark)
		rs.add(tableMangle, chainDivert, "-j", "MARK", "--set-mark", mark)
		rs.add(tableMangle, chainDivert, "-j", "ACCEPT")
		rs.add(tableMangle, chainTProxy, "!", "-d", hostLoopback(f), "-p", "tcp", "-j", "TPROXY",
			"--tproxy-mark", mark+"/0xffffffff", "--on-port", u16(cfg.InboundCapturePort))
	}
	rs.add(table, "PREROUTING", "-p", "tcp", "-j", chainInbound)

	for _, p := range cfg.InboundExcludes() {
		rs.decides(table, chainInbound, policy.ReasonInboundExcludedPort,
			"-p", "tcp", "--dport", u16(p), "-j", "RETURN").port = p
	}
	if cfg.InboundPorts.All {
		if cfg.Mode == policy.TProxy {
			// Packets of connections already accepted go straight to the local socket.
			rs.add(tableMangle, chainInbound, "-p", "tcp", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", chainDivert)
		}
		rs.decides(table, chainInbound, policy.ReasonInboundIncludedPort, "-p", "tcp", "-j", capture)
		return
	}
	for _, p := range cfg.InboundPorts.Ports {
		if cfg.Mode == policy.TProxy {
			rs.add(tableMangle, chainInbound, "-p", "tcp", "--dport", u16(p),
				"-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", chainDivert)
		}
		rs.decides(table, chainInbound, policy.ReasonInboundIncludedPort,
			"-p", "tcp", "--dport", u16(p), "-j", capture).port = p
	}
}

// chains lists the chains istio creates in table, in the order of its -N lines: first the
// chains that receive rules, in order of their first rule, then chains only jumped to.
func (rs ruleSet) chains(table string) []string {
	var out []string
	seen := map[string]bool{}
	addChain := func(c string) {
		if !builtin(c) && !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	for _, r := range rs {
		if r.table == table {
			addChain(r.chain)
		}
	}
	for _, r := range rs {
		if r.table == table {
			addChain(r.target())
		}
	}
	return out
}

// tables lists the tables that receive rules, sorted as istio writes them.
func (rs ruleSet) tables() []string {
	var out []string
	for _, t := range []string{tableMangle, tableNat, tableRaw} { // alphabetical, like istio
		for _, r := range rs {
			if r.table == t {
				out = append(out, t)
				break
			}
		}
	}
	return out
}

// Render returns exactly the iptables-restore input istio-iptables hands to
// `iptables-restore --noflush` for the same settings: the IPv4 nat table, in TPROXY mode
// the mangle table, with DNS capture the raw table. It has no side effects.
func Render(cfg *policy.Config) string { return rules(cfg, policy.IPv4).text() }

// Render6 returns exactly the ip6tables-restore input istio-iptables hands to
// `ip6tables-restore --noflush`, or "" when it writes no IPv6 rules (cfg.IPv6 false).
func Render6(cfg *policy.Config) string {
	if !cfg.IPv6 {
		return ""
	}
	return rules(cfg, policy.IPv6).text()
}

// Restore-input headers, as istio's dry run heads the two inputs it logs.
const (
	header4 = "# iptables-restore --noflush input\n"
	header6 = "# ip6tables-restore --noflush input\n"
)

// RenderAll is Render when istio writes IPv4 rules only; with IPv6 it is both inputs, each
// headed by a comment naming the tool that takes it, as istio's dry run prints them.
func RenderAll(cfg *policy.Config) string {
	if !cfg.IPv6 {
		return Render(cfg)
	}
	return header4 + Render(cfg) + header6 + Render6(cfg)
}

func (rs ruleSet) text() string {
	var b strings.Builder
	for _, t := range rs.tables() {
		b.WriteString("* " + t + "\n")
		for _, c := range rs.chains(t) {
			b.WriteString("-N " + c + "\n")
		}
		for _, r := range rs {
			if r.table == t {
				b.WriteString(r.line() + "\n")
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}
