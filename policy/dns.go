package policy

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// DNS capture (istio-iptables --redirect-dns): UDP and TCP to port 53 of the pod's
// nameservers, or of every destination with --capture-all-dns, go to istio-agent's DNS
// proxy on 127.0.0.1:15053, except the proxy uid's and gid's own queries. istio hard-codes
// both ports.
const (
	DNSPort      uint16 = 53
	DNSAgentPort uint16 = 15053
)

// MaxDNSServers bounds the nameservers the kernel's set holds. resolv.conf readers use
// three (glibc's MAXNS); more is a mistake worth a word.
const MaxDNSServers = 64

// DefaultResolvConf is where the pod's nameservers are read from when DNS capture is on
// and --dns-servers is not given: in the init container, the pod's own.
const DefaultResolvConf = "/etc/resolv.conf"

// EnvDNSCapture is the environment variable that turns DNS capture on besides
// $REDIRECT_DNS: istio-agent's own switch for its DNS proxy, which istio-iptables and
// istio-cni read too (from the proxy's environment or its ProxyConfig's proxyMetadata).
const EnvDNSCapture = "ISTIO_META_DNS_CAPTURE"

// capturesByNameserver reports whether DNS capture takes only the nameservers' queries,
// the nameservers then being required (from --dns-servers, else resolv.conf).
func (c *Config) capturesByNameserver() bool { return c.RedirectDNS && !c.CaptureAllDNS }

// CapturesDNS reports whether DNS capture is on. istio-iptables ignores --capture-all-dns
// without --redirect-dns, and so does divert.
func (c *Config) CapturesDNS() bool {
	return c.RedirectDNS && (c.CaptureAllDNS || len(c.DNSServers) > 0)
}

// DNSCaptures reports whether a query to dst:53 is one DNS capture takes: every
// destination with --capture-all-dns, else the nameservers. Callers check CapturesDNS and
// the port; the rule order around it is Decide's.
func (c *Config) DNSCaptures(dst netip.Addr) bool {
	return c.CaptureAllDNS || slices.Contains(c.DNSServers, dst.Unmap())
}

// dnsPortSpecial reports whether port 53 is carved out of the hairpin and "local
// destination" rules, as istio does when DNS capture is on (so an app's TCP query to a
// nameserver on the pod's own address reaches ISTIO_OUTPUT_DNS).
func (c *Config) dnsPortSpecial(port uint16) bool { return c.CapturesDNS() && port == DNSPort }

// ParseResolvConf returns the nameservers of a resolv.conf, in order, as the resolver reads
// them ("nameserver ADDR" lines; '#' and ';' start comments). A scoped IPv6 address keeps
// its zone out: the address is what a packet carries.
func ParseResolvConf(data []byte) ([]netip.Addr, error) {
	var out []netip.Addr
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexAny(line, "#;"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "nameserver" {
			continue
		}
		if len(f) < 2 {
			return nil, fmt.Errorf("line %d: nameserver with no address", n)
		}
		s, _, _ := strings.Cut(f[1], "%")
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("line %d: nameserver %q is not an IP address", n, f[1])
		}
		out = append(out, a.Unmap())
	}
	return out, sc.Err()
}

// checkDNSServers refuses what DNS capture cannot honour: too many nameservers. IPv6 ones
// are captured by the IPv6 rules, when the pod's are written (Config.IPv6).
func checkDNSServers(servers []netip.Addr) error {
	if len(servers) > MaxDNSServers {
		return fmt.Errorf("%d nameservers, more than %d; list the ones the pod's resolver uses", len(servers), MaxDNSServers)
	}
	return nil
}

// parseAddrs parses a comma-separated list of IP addresses.
func parseAddrs(s string) ([]netip.Addr, error) {
	fields, err := splitList(s)
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, f := range fields {
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("%q is not an IP address (like 10.96.0.10 or fd00:10:96::a)", f)
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

func joinAddrs(addrs []netip.Addr) string {
	parts := make([]string, len(addrs))
	for i, a := range addrs {
		parts[i] = a.String()
	}
	return strings.Join(parts, ",")
}
