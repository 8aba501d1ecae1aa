package policy

import "strings"

// Descriptions of a Config for people: the CLI's messages and dry runs print them.

// CommandLine is Args as one line, each value quoted where a shell would need it ('*',
// empty, or with spaces).
func (c *Config) CommandLine() string {
	args := c.Args()
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, "* ") {
			args[i] = "'" + a + "'"
		}
	}
	return strings.Join(args, " ")
}

// InboundPortsText names the inbound ports captured: "[80,443]", "*", or "* except ...".
func (c *Config) InboundPortsText() string {
	if !c.InboundPorts.All {
		return "[" + c.InboundPorts.String() + "]"
	}
	if len(c.InboundExcludes()) == 0 {
		return "*"
	}
	return "* except " + PortList{Ports: c.InboundExcludes()}.String()
}

// FamiliesText names the families c captures, and why IPv6 is among them.
func (c *Config) FamiliesText() string {
	if c.IPv6 {
		return "IPv4 and IPv6 (" + c.IPv6Why() + ")"
	}
	return "IPv4"
}

// IPv6Why says why IPv6 is captured, as istio-iptables decides it (DecideIPv6).
func (c *Config) IPv6Why() string {
	if c.DualStack {
		return "dual stack, the pod has an IPv6 address"
	}
	return "the pod has IPv6 addresses only"
}
