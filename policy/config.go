// Package policy holds the user's capture intent (the istio-iptables settings), parses and
// validates it once, and is the executable reference model of the verdicts (Decide).
// Nothing downstream re-parses strings: the eBPF and iptables backends both render a Config.
package policy

import (
	"fmt"
	"net/netip"
	"slices"
)

// InterceptMode is how inbound connections reach the proxy (istio-iptables -m).
type InterceptMode uint8

const (
	// Redirect is istio's REDIRECT mode: nat REDIRECT to the inbound capture port.
	Redirect InterceptMode = iota
	// TProxy is istio's TPROXY mode: mangle TPROXY plus policy routing; the source is kept.
	TProxy
)

func (m InterceptMode) String() string {
	if m == TProxy {
		return "TPROXY"
	}
	return "REDIRECT"
}

// Well-known addresses and ports of the Istio sidecar contract.
var (
	// InboundPassthroughSource is the source address the proxy binds when it forwards an
	// inbound connection to the app; such connections are never captured again.
	InboundPassthroughSource = netip.MustParseAddr("127.0.0.6")
	// Localhost is the one loopback address the proxy's hairpin rule leaves alone.
	Localhost = netip.MustParseAddr("127.0.0.1")
)

// PortList is a list of ports, or All (istio's "*").
type PortList struct {
	All   bool
	Ports []uint16
}

// Contains reports whether port is in the list (always, for All).
func (l PortList) Contains(port uint16) bool { return l.All || slices.Contains(l.Ports, port) }

// String renders the list the way istio-iptables takes it.
func (l PortList) String() string {
	if l.All {
		return "*"
	}
	return joinPorts(l.Ports)
}

// CIDRList is a list of prefixes, or All (istio's "*").
type CIDRList struct {
	All      bool
	Prefixes []netip.Prefix
}

// Contains reports whether addr is inside one of the prefixes (always, for All).
func (l CIDRList) Contains(addr netip.Addr) bool {
	return l.All || containsAddr(l.Prefixes, addr)
}

func (l CIDRList) String() string {
	if l.All {
		return "*"
	}
	return joinPrefixes(l.Prefixes)
}

// Config is every istio-iptables setting that shapes TCP capture, parsed and validated.
// Build one with Default and Parse (or the flag set from Flags); the zero value is not useful.
type Config struct {
	// ProxyPort is where outbound connections are redirected (-p, default 15001).
	ProxyPort uint16
	// InboundCapturePort is where inbound connections are redirected (-z, default 15006).
	InboundCapturePort uint16
	// InboundTunnelPort is never captured inbound nor hairpinned (-e, default 15008).
	InboundTunnelPort uint16
	// ProxyUID's connections are never captured outbound (-u, default 1337).
	ProxyUID uint32
	// ProxyGID's connections are never captured outbound (-g, defaults to ProxyUID).
	ProxyGID uint32
	// Mode selects REDIRECT or TPROXY for inbound (-m).
	Mode InterceptMode
	// TProxyMark and TProxyRouteTable configure TPROXY mode (-t, -r).
	TProxyMark       uint32
	TProxyRouteTable uint32
	// DualStack is istio's --dual-stack ($DUAL_STACK, $ISTIO_DUAL_STACK): IPv6 is captured
	// when the pod has any IPv6 address, not only when its first address is IPv6
	// (DecideIPv6 sets IPv6 from it).
	DualStack bool
	// InboundPorts are captured inbound (-b); All captures every port but InboundExcludePorts.
	InboundPorts PortList
	// InboundExcludePorts pass inbound when InboundPorts is All (-d).
	InboundExcludePorts []uint16
	// OutboundPorts are captured outbound whatever their destination (-q).
	OutboundPorts []uint16
	// OutboundExcludePorts are never captured outbound (-o). They are checked first.
	OutboundExcludePorts []uint16
	// OutboundCIDRs are the destinations captured outbound (-i); All captures everything.
	OutboundCIDRs CIDRList
	// OutboundExcludeCIDRs are destinations never captured outbound (-x).
	OutboundExcludeCIDRs []netip.Prefix
	// RedirectDNS turns DNS capture on (--redirect-dns, $REDIRECT_DNS,
	// $ISTIO_META_DNS_CAPTURE): queries to DNSServers' port 53 go to DNSAgentPort.
	RedirectDNS bool
	// CaptureAllDNS captures every destination's port 53, not only DNSServers'
	// (--capture-all-dns, $CAPTURE_ALL_DNS). Alone it does nothing, as in istio-iptables.
	CaptureAllDNS bool
	// DNSServers are the pod's nameservers, both families (--dns-servers, else its
	// resolv.conf), read only when RedirectDNS is on without CaptureAllDNS.
	DNSServers []netip.Addr
	// IPv6 captures native IPv6 connections too, with ip6tables' rules (istio-iptables
	// writes them when the pod's first address is IPv6, or with dual stack on); IPv4 is
	// always captured.
	IPv6 bool
	// OutboundOwnerGroups narrows outbound capture by the socket's owning group
	// ($ISTIO_OUTBOUND_OWNER_GROUPS, $ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE).
	OutboundOwnerGroups OwnerGroups
	// ExcludeInterfaces are never captured, in or out (-c): connections arriving on them,
	// or routed out through them.
	ExcludeInterfaces []string
	// KubeVirtInterfaces (-k): TCP arriving on them (a VM behind the pod) is captured as
	// outbound, to ProxyPort, where -i includes its destination.
	KubeVirtInterfaces []string
	// DropInvalid drops packets conntrack finds INVALID before they reach the pod
	// (--drop-invalid, $DROP_INVALID, $INVALID_DROP). It changes no verdict.
	DropInvalid bool
}

// IstioIptablesDefaults is what istio-iptables does when a flag is not given, which is not
// what Istio's injector passes (Default): no inbound ports (-b ""), no inbound exclusions
// (-d ""), no outbound CIDRs (-i ""). Only the proxy's ports and ids and the TPROXY settings
// have defaults there. (istio resolves the uid default at run time: the uid of $ENVOY_USER,
// istio-proxy, else 1337; that lookup is the CLI's.)
func IstioIptablesDefaults() Config {
	return Config{
		ProxyPort:          15001,
		InboundCapturePort: 15006,
		InboundTunnelPort:  15008,
		ProxyUID:           1337,
		ProxyGID:           1337,
		Mode:               Redirect,
		TProxyMark:         1337,
		TProxyRouteTable:   133,
	}
}

// InjectorInboundExcludePorts are the inbound ports Istio's injector always excludes (-d):
// Prometheus merge (15090), health (15021) and agent status (15020), whatever a pod's
// annotations add.
func InjectorInboundExcludePorts() []uint16 { return []uint16{15090, 15021, 15020} }

// Default is what Istio's sidecar injector asks of istio-iptables for a standard pod:
// -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020.
func Default() Config {
	c := IstioIptablesDefaults()
	c.InboundPorts = PortList{All: true}
	c.InboundExcludePorts = InjectorInboundExcludePorts()
	c.OutboundCIDRs = CIDRList{All: true}
	return c
}

// Validate checks the relations between settings that parsing alone cannot see.
func (c *Config) Validate() error {
	for _, p := range []struct {
		flag string
		port uint16
	}{{FlagProxyPort, c.ProxyPort}, {FlagInboundCapturePort, c.InboundCapturePort}, {FlagInboundTunnelPort, c.InboundTunnelPort}} {
		if p.port == 0 {
			return fmt.Errorf("invalid --%s: port 0; use a port between 1 and 65535", p.flag)
		}
	}
	// istio-iptables has no such flag (it reads resolv.conf, and only with DNS capture on):
	// nameservers given with capture off would do nothing while status and explain list
	// them, so whoever wrote them expects a capture that is not there.
	if len(c.DNSServers) > 0 && !c.RedirectDNS {
		return fmt.Errorf("invalid --%s %q: nameservers are used only with --%s; add --%s (or $ISTIO_META_DNS_CAPTURE=true), or drop --%s",
			FlagDNSServers, joinAddrs(c.DNSServers), FlagRedirectDNS, FlagRedirectDNS, FlagDNSServers)
	}
	if c.capturesByNameserver() && len(c.DNSServers) == 0 {
		return fmt.Errorf("invalid --%s: no nameserver to capture; list the pod's with --%s, or use --%s", FlagRedirectDNS, FlagDNSServers, FlagCaptureAllDNS)
	}
	if err := checkDNSServers(c.DNSServers); err != nil {
		return fmt.Errorf("invalid --%s: %w", FlagDNSServers, err)
	}
	if len(c.KubeVirtInterfaces) > 0 && c.Mode == TProxy {
		return fmt.Errorf("invalid -k/--%s with -m TPROXY: istio's TPROXY rules (mangle, ahead of nat) take the virtual interfaces' TCP as inbound before -k's rules see it; use -m REDIRECT",
			FlagKubeVirtInterfaces)
	}
	if c.ProxyPort == c.InboundCapturePort {
		return fmt.Errorf("invalid -p/--%s %d: it is also the inbound capture port (-z/--%s); use two different ports",
			FlagProxyPort, c.ProxyPort, FlagInboundCapturePort)
	}
	return nil
}

// OutboundExcludeCIDRs4 and friends: the IPv4 subset, which is all the v4 backends render.
func ipv4Only(prefixes []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range prefixes {
		if p.Addr().Is4() {
			out = append(out, p)
		}
	}
	return out
}

// IPv4OutboundCIDRs returns the IPv4 prefixes of -i (nil for All).
func (c *Config) IPv4OutboundCIDRs() []netip.Prefix { return ipv4Only(c.OutboundCIDRs.Prefixes) }

// IPv4OutboundExcludeCIDRs returns the IPv4 prefixes of -x.
func (c *Config) IPv4OutboundExcludeCIDRs() []netip.Prefix { return ipv4Only(c.OutboundExcludeCIDRs) }

func ipv6Only(prefixes []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range prefixes {
		if !p.Addr().Is4() {
			out = append(out, p)
		}
	}
	return out
}

// IPv6OutboundCIDRs returns the IPv6 prefixes of -i (nil for All).
func (c *Config) IPv6OutboundCIDRs() []netip.Prefix { return ipv6Only(c.OutboundCIDRs.Prefixes) }

// IPv6OutboundExcludeCIDRs returns the IPv6 prefixes of -x.
func (c *Config) IPv6OutboundExcludeCIDRs() []netip.Prefix { return ipv6Only(c.OutboundExcludeCIDRs) }

func containsAddr(prefixes []netip.Prefix, addr netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}
