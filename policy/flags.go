// istio-iptables' command line as divert reads it: every flag, its default and its
// environment variable, in one table with its parser. Over 400 lines because the table is
// istio's whole flag set; splitting it would put one flag's rules in two files.

package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"unicode"

	"github.com/spf13/pflag"
)

// Flag names: istio-iptables' long names, so its command lines work unchanged. The short
// letters and environment variables match istio-iptables too.
const (
	FlagProxyPort            = "envoy-port"                         // -p
	FlagInboundCapturePort   = "inbound-capture-port"               // -z
	FlagInboundTunnelPort    = "inbound-tunnel-port"                // -e
	FlagProxyUID             = "proxy-uid"                          // -u
	FlagProxyGID             = "proxy-gid"                          // -g
	FlagMode                 = "istio-inbound-interception-mode"    // -m
	FlagTProxyMark           = "istio-inbound-tproxy-mark"          // -t
	FlagTProxyRouteTable     = "istio-inbound-tproxy-route-table"   // -r
	FlagInboundPorts         = "istio-inbound-ports"                // -b
	FlagInboundExcludePorts  = "istio-local-exclude-ports"          // -d
	FlagOutboundPorts        = "istio-outbound-ports"               // -q
	FlagOutboundExcludePorts = "istio-local-outbound-ports-exclude" // -o
	FlagOutboundCIDRs        = "istio-service-cidr"                 // -i
	FlagOutboundExcludeCIDRs = "istio-service-exclude-cidr"         // -x
	FlagRedirectDNS          = "redirect-dns"                       // also $ISTIO_META_DNS_CAPTURE
	FlagCaptureAllDNS        = "capture-all-dns"
	FlagDualStack            = "dual-stack"               // also $ISTIO_DUAL_STACK
	FlagExcludeInterfaces    = "istio-exclude-interfaces" // -c
	FlagKubeVirtInterfaces   = "kube-virt-interfaces"     // -k
	FlagDropInvalid          = "drop-invalid"             // also $INVALID_DROP
	// divert's own: where the nameservers come from (istio-iptables reads /etc/resolv.conf).
	FlagDNSServers = "dns-servers"
	FlagResolvConf = "resolv-conf"
	// divert's own flags for istio's environment-only owner-group settings, so a command
	// line (divert attach, the node agent) can give them too; their variables are istio's.
	FlagOwnerGroups        = "istio-outbound-owner-groups"         // $ISTIO_OUTBOUND_OWNER_GROUPS
	FlagOwnerGroupsExclude = "istio-outbound-owner-groups-exclude" // $ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE
)

// EnvInvalidDrop is the older variable for --drop-invalid, the one istio-cni reads from the
// istio-proxy container.
const EnvInvalidDrop = "INVALID_DROP"

type flagSpec struct {
	name, short, usage string
	get                func(*Config) string
	set                func(*Config, string) error
}

// flagExtra is what only some flags have.
type flagExtra struct {
	// moreEnv are read after EnvVar(name) and override it (istio's flag.AdditionalEnv).
	moreEnv []string
	// noEnv: divert's own flag, no environment variable.
	noEnv bool
	// boolean flags may be given bare (--redirect-dns), as istio-iptables' bool flags.
	boolean bool
}

var flagExtras = map[string]flagExtra{
	FlagRedirectDNS:   {moreEnv: []string{EnvDNSCapture}, boolean: true},
	FlagDropInvalid:   {moreEnv: []string{EnvInvalidDrop}, boolean: true},
	FlagCaptureAllDNS: {boolean: true},
	FlagDualStack:     {moreEnv: []string{EnvDualStack}, boolean: true},
	FlagDNSServers:    {noEnv: true},
}

// display is how messages name the flag: "-p/--envoy-port" or "--redirect-dns".
func (s flagSpec) display() string {
	if s.short == "" {
		return "--" + s.name
	}
	return "-" + s.short + "/--" + s.name
}

// envs are the variables read for the flag, a later one overriding an earlier one.
func (s flagSpec) envs() []string {
	x := flagExtras[s.name]
	if x.noEnv {
		return nil
	}
	return append([]string{EnvVar(s.name)}, x.moreEnv...)
}

// EnvVar is the environment variable istio-iptables reads for a flag (viper's automatic
// mapping: upper case, dashes to underscores).
func EnvVar(flag string) string {
	return strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

var flagSpecs = []flagSpec{
	{FlagProxyPort, "p", "port the proxy listens on for outbound connections",
		func(c *Config) string { return itoa(c.ProxyPort) },
		func(c *Config, s string) (err error) { c.ProxyPort, err = parsePort(s); return }},
	{FlagInboundCapturePort, "z", "port the proxy listens on for inbound connections",
		func(c *Config) string { return itoa(c.InboundCapturePort) },
		func(c *Config, s string) (err error) { c.InboundCapturePort, err = parsePort(s); return }},
	{FlagInboundTunnelPort, "e", "tunnel port: never captured inbound, never hairpinned",
		func(c *Config) string { return itoa(c.InboundTunnelPort) },
		func(c *Config, s string) (err error) { c.InboundTunnelPort, err = parsePort(s); return }},
	{FlagProxyUID, "u", "uid of the proxy; its connections are never captured",
		func(c *Config) string { return itoa(c.ProxyUID) },
		func(c *Config, s string) (err error) { c.ProxyUID, err = parseID(s); return }},
	{FlagProxyGID, "g", "gid of the proxy; its connections are never captured (default: the uid)",
		func(c *Config) string { return "" },
		func(c *Config, s string) (err error) { c.ProxyGID, err = parseID(s); return }},
	{FlagMode, "m", `inbound interception mode, "REDIRECT" or "TPROXY"`,
		func(c *Config) string { return c.Mode.String() },
		func(c *Config, s string) error {
			switch strings.ToUpper(s) {
			case "REDIRECT", "":
				c.Mode = Redirect
			case "TPROXY":
				c.Mode = TProxy
			default:
				return fmt.Errorf("%q is not a mode; use REDIRECT or TPROXY", s)
			}
			return nil
		}},
	{FlagTProxyMark, "t", "packet mark used in TPROXY mode",
		func(c *Config) string { return itoa(c.TProxyMark) },
		func(c *Config, s string) (err error) { c.TProxyMark, err = parseID(s); return }},
	{FlagTProxyRouteTable, "r", "policy routing table used in TPROXY mode",
		func(c *Config) string { return itoa(c.TProxyRouteTable) },
		func(c *Config, s string) (err error) { c.TProxyRouteTable, err = parseID(s); return }},
	{FlagInboundPorts, "b", `inbound ports to capture, comma separated; "*" = all, "" = none`,
		func(c *Config) string { return c.InboundPorts.String() },
		func(c *Config, s string) (err error) { c.InboundPorts, err = parsePortList(s); return }},
	{FlagInboundExcludePorts, "d", `inbound ports never captured (applies with -b "*")`,
		func(c *Config) string { return joinPorts(c.InboundExcludePorts) },
		func(c *Config, s string) (err error) { c.InboundExcludePorts, err = parsePorts(s); return }},
	{FlagOutboundPorts, "q", "outbound ports captured whatever the destination",
		func(c *Config) string { return joinPorts(c.OutboundPorts) },
		func(c *Config, s string) (err error) { c.OutboundPorts, err = parsePorts(s); return }},
	{FlagOutboundExcludePorts, "o", "outbound ports never captured (checked before anything else)",
		func(c *Config) string { return joinPorts(c.OutboundExcludePorts) },
		func(c *Config, s string) (err error) { c.OutboundExcludePorts, err = parsePorts(s); return }},
	{FlagOutboundCIDRs, "i", `outbound destinations to capture, CIDRs of both families comma separated; "*" = all, "" = none`,
		func(c *Config) string { return c.OutboundCIDRs.String() },
		func(c *Config, s string) (err error) {
			if c.OutboundCIDRs, err = parseCIDRList(s); err == nil {
				err = checkPrefixes(c.OutboundCIDRs.Prefixes)
			}
			return
		}},
	{FlagOutboundExcludeCIDRs, "x", "outbound destinations never captured, CIDRs of both families comma separated",
		func(c *Config) string { return joinPrefixes(c.OutboundExcludeCIDRs) },
		func(c *Config, s string) (err error) {
			if c.OutboundExcludeCIDRs, err = parseCIDRs(s); err == nil {
				err = checkPrefixes(c.OutboundExcludeCIDRs)
			}
			return
		}},
	{FlagRedirectDNS, "", fmt.Sprintf("capture DNS: UDP and TCP to port %d of the pod's nameservers go to istio-agent on %s:%d", DNSPort, Localhost, DNSAgentPort),
		func(c *Config) string { return strconv.FormatBool(c.RedirectDNS) },
		func(c *Config, s string) (err error) { c.RedirectDNS, err = parseBool(s); return }},
	{FlagCaptureAllDNS, "", "with --" + FlagRedirectDNS + ", capture port 53 of every destination, not only the nameservers'",
		func(c *Config) string { return strconv.FormatBool(c.CaptureAllDNS) },
		func(c *Config, s string) (err error) { c.CaptureAllDNS, err = parseBool(s); return }},
	{FlagDualStack, "", "capture IPv6 too when the pod has any IPv6 address (without it, only when it has no IPv4 address)",
		func(c *Config) string { return strconv.FormatBool(c.DualStack) },
		func(c *Config, s string) (err error) { c.DualStack, err = parseBool(s); return }},
	{FlagDNSServers, "", "the pod's nameservers for --" + FlagRedirectDNS + ", comma separated (default: read from --" + FlagResolvConf + ")",
		func(c *Config) string { return joinAddrs(c.DNSServers) },
		func(c *Config, s string) (err error) { c.DNSServers, err = parseAddrs(s); return }},
	{FlagExcludeInterfaces, "c", "interfaces whose traffic, in or out, is never captured, comma separated",
		func(c *Config) string { return strings.Join(c.ExcludeInterfaces, ",") },
		func(c *Config, s string) (err error) { c.ExcludeInterfaces, err = parseInterfaces(s); return }},
	{FlagKubeVirtInterfaces, "k", "virtual interfaces (KubeVirt) whose inbound TCP is captured as outbound, comma separated",
		func(c *Config) string { return strings.Join(c.KubeVirtInterfaces, ",") },
		func(c *Config, s string) (err error) { c.KubeVirtInterfaces, err = parseInterfaces(s); return }},
	{FlagDropInvalid, "", "drop packets conntrack finds INVALID before they reach the pod (iptables backend; nothing to do with eBPF)",
		func(c *Config) string { return strconv.FormatBool(c.DropInvalid) },
		func(c *Config, s string) (err error) { c.DropInvalid, err = parseBool(s); return }},
	{FlagOwnerGroups, "", `groups (names or gids) whose outbound connections are captured, comma separated; "*" = all`,
		ownerGroupsIncludeString, parseOwnerGroupsInclude},
	{FlagOwnerGroupsExclude, "", `groups (names or gids) whose outbound connections are never captured (with "*" above)`,
		func(c *Config) string { return joinIDs(c.OutboundOwnerGroups.Exclude) },
		func(c *Config, s string) (err error) {
			c.OutboundOwnerGroups.Exclude, err = parseGroups(s, MaxOwnerGroupsExclude)
			return
		}},
}

// Flags registers every policy flag on fs with def's values as defaults, and returns the
// function that turns what was given into a validated Config. A flag that was not given
// falls back to its istio-iptables environment variable (read through getenv), then to def.
func Flags(fs *pflag.FlagSet, def Config) func(getenv func(string) string) (Config, error) {
	values := make(map[string]*string, len(flagSpecs))
	for _, s := range flagSpecs {
		usage := s.usage
		if envs := s.envs(); len(envs) > 0 {
			usage = fmt.Sprintf("%s (env %s)", s.usage, strings.Join(envs, ", "))
		}
		values[s.name] = fs.StringP(s.name, s.short, s.get(&def), usage)
		if flagExtras[s.name].boolean {
			fs.Lookup(s.name).NoOptDefVal = "true"
		}
	}
	resolvConf := fs.String(FlagResolvConf, DefaultResolvConf, "the pod's resolv.conf, read for --"+FlagDNSServers+
		" when --"+FlagRedirectDNS+" is on without --"+FlagCaptureAllDNS+" (divert attach: pass the pod's)")
	return func(getenv func(string) string) (Config, error) {
		cfg := def
		gidGiven, dnsServersGiven := false, false
		for _, s := range flagSpecs {
			v, given, source := *values[s.name], fs.Changed(s.name), ""
			if !given {
				for _, env := range s.envs() {
					if ev := getenv(env); ev != "" {
						v, given, source = ev, true, " (from $"+env+")"
					}
				}
			}
			if !given {
				continue
			}
			if err := s.set(&cfg, strings.TrimSpace(v)); err != nil {
				return Config{}, fmt.Errorf("invalid %s%s %q: %w", s.display(), source, v, err)
			}
			gidGiven = gidGiven || s.name == FlagProxyGID
			dnsServersGiven = dnsServersGiven || s.name == FlagDNSServers
		}
		if !gidGiven {
			cfg.ProxyGID = cfg.ProxyUID
		}
		// istio-iptables reads the nameservers only when it captures by nameserver.
		if cfg.capturesByNameserver() && !dnsServersGiven {
			servers, err := readResolvConf(*resolvConf)
			if err != nil {
				return Config{}, err
			}
			cfg.DNSServers = servers
		}
		if err := cfg.Validate(); err != nil {
			return Config{}, err
		}
		return cfg, nil
	}
}

// ParseArgs turns an istio-iptables command line into a validated Config, as Flags does on
// a flag set of its own, over def and without the environment: for a policy written as
// arguments by a program (the node agent's annotations, test tables) rather than typed.
func ParseArgs(def Config, args ...string) (Config, error) {
	fs := pflag.NewFlagSet("istio-iptables", pflag.ContinueOnError)
	parse := Flags(fs, def)
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	return parse(func(string) string { return "" })
}

// Args renders cfg as istio-iptables flags, the inverse of Flags (used by explain and docs).
func (c *Config) Args() []string {
	var args []string
	for _, s := range flagSpecs {
		v := s.get(c)
		if s.name == FlagProxyGID {
			v = itoa(c.ProxyGID)
		}
		if s.short == "" {
			args = append(args, "--"+s.name+"="+v)
			continue
		}
		args = append(args, "-"+s.short, v)
	}
	return args
}

// readResolvConf reads the pod's nameservers, with errors that name where they came from and
// what to do instead.
func readResolvConf(path string) ([]netip.Addr, error) {
	fix := fmt.Sprintf("pass the pod's resolv.conf with --%s, its nameservers with --%s, or use --%s", FlagResolvConf, FlagDNSServers, FlagCaptureAllDNS)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("invalid --%s %q for --%s: %w; %s", FlagResolvConf, path, FlagRedirectDNS, unwrapPath(err), fix)
	}
	servers, err := ParseResolvConf(data)
	if err != nil {
		return nil, fmt.Errorf("invalid --%s %q: %w; %s", FlagResolvConf, path, err, fix)
	}
	if len(servers) == 0 {
		return nil, fmt.Errorf("invalid --%s %q for --%s: it lists no nameserver; %s", FlagResolvConf, path, FlagRedirectDNS, fix)
	}
	if err := checkDNSServers(servers); err != nil {
		return nil, fmt.Errorf("invalid --%s %q: %w", FlagResolvConf, path, err)
	}
	return servers, nil
}

// unwrapPath drops the path an *os.PathError repeats.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func parseBool(s string) (bool, error) {
	b, err := strconv.ParseBool(s)
	if err != nil {
		return false, fmt.Errorf("use true or false")
	}
	return b, nil
}

func itoa[T uint16 | uint32](v T) string { return strconv.FormatUint(uint64(v), 10) }

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 || n > 65535 {
		return 0, fmt.Errorf("port %q out of range; use 1-65535", s)
	}
	return uint16(n), nil
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not a number", s)
	}
	return uint32(n), nil
}

// splitList splits a comma-separated list, as istio-iptables splits its lists, trimming
// spaces around items (" 15021" is 15021). A space inside an item is a list separated by
// spaces, never a valid port or CIDR: say how to write it.
func splitList(s string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		if strings.ContainsFunc(f, unicode.IsSpace) {
			return nil, fmt.Errorf("separate the items with commas, like %s (%q has spaces)", strings.Join(strings.Fields(f), ","), f)
		}
		out = append(out, f)
	}
	return out, nil
}

func parsePorts(s string) ([]uint16, error) {
	var ports []uint16
	fields, err := splitList(s)
	if err != nil {
		return nil, err
	}
	for _, f := range fields {
		p, err := parsePort(f)
		if err != nil {
			return nil, err
		}
		ports = append(ports, p)
	}
	return ports, nil
}

func parsePortList(s string) (PortList, error) {
	if s == "*" {
		return PortList{All: true}, nil
	}
	ports, err := parsePorts(s)
	return PortList{Ports: ports}, err
}

func parseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	fields, err := splitList(s)
	if err != nil {
		return nil, err
	}
	for _, f := range fields {
		p, err := parseCIDR(f)
		if err != nil {
			return nil, err
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// parseCIDR reads one CIDR of either family; a bare address means a host route, as
// iptables reads it.
func parseCIDR(f string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(f); err == nil {
		return p, nil
	}
	addr, bits, hasBits := strings.Cut(f, "/")
	a, err := netip.ParseAddr(addr)
	switch {
	case err != nil:
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (like 10.0.0.0/8 or fd00::/8)", f)
	case a.Zone() != "":
		return netip.Prefix{}, fmt.Errorf("%q has a zone (%%%s), which a CIDR cannot have; drop it", f, a.Zone())
	case hasBits && a.Is4():
		return netip.Prefix{}, fmt.Errorf("prefix length %q is not 0-32; write an IPv4 range like 10.0.0.0/8", bits)
	case hasBits:
		return netip.Prefix{}, fmt.Errorf("prefix length %q is not 0-128; write an IPv6 range like fd00::/8", bits)
	}
	return Host(a), nil
}

func parseCIDRList(s string) (CIDRList, error) {
	if s == "*" {
		return CIDRList{All: true}, nil
	}
	prefixes, err := parseCIDRs(s)
	return CIDRList{Prefixes: prefixes}, err
}

func joinPorts(ports []uint16) string {
	parts := make([]string, len(ports))
	for i, p := range ports {
		parts[i] = itoa(p)
	}
	return strings.Join(parts, ",")
}

func joinPrefixes(prefixes []netip.Prefix) string {
	parts := make([]string, len(prefixes))
	for i, p := range prefixes {
		parts[i] = p.String()
	}
	return strings.Join(parts, ",")
}
