package iptables

import (
	"net/netip"
	"testing"

	"github.com/meshdivert/divert/policy"
)

// referenceArgs is the istio-iptables command line of shared/reference (what Istio's
// injector passes). Every case starts from it, so a case reads as "istio-iptables ... plus
// these flags" and its golden can be compared with istio's own output.
var referenceArgs = []string{
	"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
	"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
}

type renderCase struct {
	name string
	args []string // appended to referenceArgs; a later flag overrides an earlier one
	// pod are the pod's addresses, from which istio decides IPv6 (policy.PodIPv6); nil is
	// an IPv4 pod.
	pod []string
}

// cases is the one table of flag combinations: each has a golden file
// (testdata/<name>.golden) and is applied to a real netns by the privileged tests.
var cases = []renderCase{
	{"default", nil, nil},
	{"inbound-ports-include", []string{"-b", "32000,31000"}, nil},
	{"inbound-ports-include-ignores-exclude", []string{"-b", "8080", "-d", "8080,9090"}, nil},
	{"inbound-ports-empty", []string{"-b", ""}, nil},
	{"inbound-exclude-empty", []string{"-d", ""}, nil},
	{"inbound-exclude-custom", []string{"-d", "22,8443"}, nil},
	{"outbound-cidrs-include", []string{"-i", "10.0.0.0/8,172.16.0.0/12"}, nil},
	{"outbound-cidrs-empty", []string{"-i", ""}, nil},
	{"outbound-cidrs-loopback", []string{"-i", "127.1.2.3/32"}, nil},
	{"outbound-exclude-cidrs", []string{"-x", "1.1.0.0/16,10.96.0.10/32"}, nil},
	{"outbound-ports-exclude", []string{"-o", "22,80,443"}, nil},
	{"outbound-ports-exclude-single", []string{"-o", "22"}, nil},
	{"outbound-ports-include", []string{"-q", "32000,31000"}, nil},
	{"outbound-ports-include-cidrs", []string{"-q", "3306", "-i", "10.0.0.0/8", "-x", "10.1.0.0/16"}, nil},
	{"outbound-ports-include-no-cidrs", []string{"-q", "3306", "-i", ""}, nil},
	{"gid", []string{"-g", "1338"}, nil},
	{"uid-gid", []string{"-u", "1000", "-g", "2000"}, nil},
	{"custom-ports", []string{"-p", "16001", "-z", "16006", "-e", "16008"}, nil},
	{"everything-redirect", []string{
		"-o", "22,9000", "-x", "10.96.0.0/12", "-q", "5432", "-i", "10.0.0.0/8,192.168.0.0/16",
		"-b", "8080,8443", "-g", "1338",
	}, nil},
	{"dns", []string{"--redirect-dns", "--dns-servers", "10.96.0.10"}, nil},
	{"dns-capture-all", []string{"--redirect-dns", "--capture-all-dns"}, nil},
	{"dns-two-nameservers-exclusions", []string{"--redirect-dns", "--dns-servers", "10.96.0.10,10.96.0.11", "-x", "10.0.0.0/8", "-o", "3306"}, nil},
	{"dns-uid-gid", []string{"--redirect-dns", "--dns-servers", "10.96.0.10", "-u", "1000", "-g", "2000"}, nil},
	{"dns-outbound-port-53-excluded", []string{"--redirect-dns", "--dns-servers", "10.96.0.10", "-o", "53"}, nil},
	{"dns-outbound-cidrs-loopback", []string{"--redirect-dns", "--capture-all-dns", "-i", "127.1.2.3/32"}, nil},
	{"dns-outbound-cidrs-empty", []string{"--redirect-dns", "--dns-servers", "10.96.0.10", "-i", ""}, nil},
	{"capture-all-dns-alone", []string{"--capture-all-dns"}, nil},
	{"owner-groups-include", []string{"--istio-outbound-owner-groups", "1000,2000"}, nil},
	{"owner-groups-exclude", []string{"--istio-outbound-owner-groups-exclude", "3000,3001"}, nil},
	{"owner-groups-dns", []string{"--istio-outbound-owner-groups", "1000", "--redirect-dns", "--dns-servers", "10.96.0.10"}, nil},
	{"exclude-interfaces", []string{"-c", "net1,net2"}, nil},
	{"exclude-interfaces-tproxy", []string{"-m", "TPROXY", "-c", "net1"}, nil},
	{"kube-virt-interfaces", []string{"-k", "eth1,eth2"}, nil},
	{"kube-virt-interfaces-cidrs", []string{"-k", "eth1,eth2", "-i", "10.0.0.0/8,192.168.0.0/16", "-c", "net1"}, nil},
	{"drop-invalid", []string{"--drop-invalid"}, nil},
	{"drop-invalid-tproxy", []string{"-m", "TPROXY", "--drop-invalid", "-c", "net1"}, nil},
	{"tproxy", []string{"-m", "TPROXY"}, nil},
	{"tproxy-custom-mark-table", []string{"-m", "TPROXY", "-t", "1400", "-r", "140"}, nil},
	{"tproxy-inbound-ports-include", []string{"-m", "TPROXY", "-b", "32000,31000"}, nil},
	{"tproxy-inbound-ports-empty", []string{"-m", "TPROXY", "-b", ""}, nil},
	{"tproxy-everything", []string{
		"-m", "TPROXY", "-t", "1400", "-r", "140", "-p", "16001", "-z", "16006", "-e", "16008",
		"-u", "1000", "-g", "2000", "-o", "22", "-x", "1.1.0.0/16", "-q", "5432",
		"-i", "10.0.0.0/8", "-b", "80,443",
	}, nil},

	// IPv6: the first three are shared/reference's ipv6.rules, dual-stack.rules and
	// dual-stack-dns-exclusions.rules (TestRenderIPv6Reference).
	{"ipv6", nil, ipv6Pod},
	{"dual-stack", []string{"--dual-stack"}, dualStackPod},
	{"dual-stack-dns-exclusions", []string{"--dual-stack", "--redirect-dns", "--dns-servers", "10.96.0.10,fd00:10:96::a",
		"-x", "10.0.0.0/8,fd00:10::/64", "-o", "3306"}, dualStackPod},
	{"dual-stack-pod-without-dual-stack", nil, dualStackPod}, // IPv4 rules only, as istio
	{"dual-stack-cidrs-mixed", []string{"--dual-stack", "-i", "10.0.0.0/8,fd00:10::/64,2001:db8::1",
		"-x", "10.96.0.0/12,fd00:10:96::/112"}, dualStackPod},
	{"dual-stack-cidrs-ipv4-only", []string{"--dual-stack", "-i", "10.0.0.0/8", "-x", "10.96.0.0/12"}, dualStackPod},
	{"dual-stack-outbound-cidrs-loopback6", []string{"--dual-stack", "-i", "::1/128"}, dualStackPod},
	{"dual-stack-dns-ipv4-nameserver", []string{"--dual-stack", "--redirect-dns", "--dns-servers", "10.96.0.10"}, dualStackPod},
	{"dual-stack-dns-ipv6-nameserver", []string{"--dual-stack", "--redirect-dns", "--dns-servers", "fd00:10:96::a"}, dualStackPod},
	{"dual-stack-dns-capture-all", []string{"--dual-stack", "--redirect-dns", "--capture-all-dns"}, dualStackPod},
	{"dual-stack-tproxy", []string{"--dual-stack", "-m", "TPROXY"}, dualStackPod},
	{"dual-stack-settings", []string{"--dual-stack", "-c", "net1", "-k", "eth1", "--drop-invalid",
		"--istio-outbound-owner-groups", "1000,2000", "-i", "10.0.0.0/8,fd00:10::/64"}, dualStackPod},
	{"ipv6-owner-groups-exclude-tproxy", []string{"-m", "TPROXY", "-c", "net1", "--drop-invalid",
		"--istio-outbound-owner-groups-exclude", "3000"}, ipv6Pod},
	{"ipv6-everything", []string{
		"-m", "TPROXY", "-t", "1400", "-r", "140", "-p", "16001", "-z", "16006", "-e", "16008",
		"-u", "1000", "-g", "2000", "-o", "22", "-x", "fd00:1::/32", "-q", "5432",
		"-i", "fd00::/8,10.0.0.0/8", "-b", "80,443", "--redirect-dns", "--dns-servers", "fd00:10:96::a",
	}, ipv6Pod},
}

// Pods' addresses for the IPv6 cases.
var (
	ipv6Pod      = []string{"fd00:10:244::5"}
	dualStackPod = []string{"10.244.0.5", "fd00:10:244::5"}
)

// caseConfig parses a case's flags exactly as the CLI does (policy.ParseArgs: policy.Flags
// over policy.Default, no environment), for a pod with addresses pod (none: IPv4 only).
func caseConfig(tb testing.TB, args []string, pod ...string) *policy.Config {
	tb.Helper()
	cfg, err := policy.ParseArgs(policy.Default(), append(append([]string{}, referenceArgs...), args...)...)
	if err != nil {
		tb.Fatalf("config %q: %v", args, err)
	}
	var addrs []netip.Addr
	for _, a := range pod {
		addrs = append(addrs, netip.MustParseAddr(a))
	}
	cfg.DecideIPv6(addrs)
	return &cfg
}
