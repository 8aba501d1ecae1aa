package iptables

import (
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

// cases is the one table of flag combinations: each has a golden file
// (testdata/<name>.golden) and is applied to a real netns by the privileged tests.
var cases = []struct {
	name string
	args []string // appended to referenceArgs; a later flag overrides an earlier one
}{
	{"default", nil},
	{"inbound-ports-include", []string{"-b", "32000,31000"}},
	{"inbound-ports-include-ignores-exclude", []string{"-b", "8080", "-d", "8080,9090"}},
	{"inbound-ports-empty", []string{"-b", ""}},
	{"inbound-exclude-empty", []string{"-d", ""}},
	{"inbound-exclude-custom", []string{"-d", "22,8443"}},
	{"outbound-cidrs-include", []string{"-i", "10.0.0.0/8,172.16.0.0/12"}},
	{"outbound-cidrs-empty", []string{"-i", ""}},
	{"outbound-cidrs-loopback", []string{"-i", "127.1.2.3/32"}},
	{"outbound-exclude-cidrs", []string{"-x", "1.1.0.0/16,10.96.0.10/32"}},
	{"outbound-ports-exclude", []string{"-o", "22,80,443"}},
	{"outbound-ports-exclude-single", []string{"-o", "22"}},
	{"outbound-ports-include", []string{"-q", "32000,31000"}},
	{"outbound-ports-include-cidrs", []string{"-q", "3306", "-i", "10.0.0.0/8", "-x", "10.1.0.0/16"}},
	{"outbound-ports-include-no-cidrs", []string{"-q", "3306", "-i", ""}},
	{"gid", []string{"-g", "1338"}},
	{"uid-gid", []string{"-u", "1000", "-g", "2000"}},
	{"custom-ports", []string{"-p", "16001", "-z", "16006", "-e", "16008"}},
	{"everything-redirect", []string{
		"-o", "22,9000", "-x", "10.96.0.0/12", "-q", "5432", "-i", "10.0.0.0/8,192.168.0.0/16",
		"-b", "8080,8443", "-g", "1338",
	}},
	{"dns", []string{"--redirect-dns", "--dns-servers", "10.96.0.10"}},
	{"dns-capture-all", []string{"--redirect-dns", "--capture-all-dns"}},
	{"dns-two-nameservers-exclusions", []string{"--redirect-dns", "--dns-servers", "10.96.0.10,10.96.0.11", "-x", "10.0.0.0/8", "-o", "3306"}},
	{"dns-uid-gid", []string{"--redirect-dns", "--dns-servers", "10.96.0.10", "-u", "1000", "-g", "2000"}},
	{"dns-outbound-port-53-excluded", []string{"--redirect-dns", "--dns-servers", "10.96.0.10", "-o", "53"}},
	{"dns-outbound-cidrs-loopback", []string{"--redirect-dns", "--capture-all-dns", "-i", "127.1.2.3/32"}},
	{"dns-outbound-cidrs-empty", []string{"--redirect-dns", "--dns-servers", "10.96.0.10", "-i", ""}},
	{"capture-all-dns-alone", []string{"--capture-all-dns"}},
	{"tproxy", []string{"-m", "TPROXY"}},
	{"tproxy-custom-mark-table", []string{"-m", "TPROXY", "-t", "1400", "-r", "140"}},
	{"tproxy-inbound-ports-include", []string{"-m", "TPROXY", "-b", "32000,31000"}},
	{"tproxy-inbound-ports-empty", []string{"-m", "TPROXY", "-b", ""}},
	{"tproxy-everything", []string{
		"-m", "TPROXY", "-t", "1400", "-r", "140", "-p", "16001", "-z", "16006", "-e", "16008",
		"-u", "1000", "-g", "2000", "-o", "22", "-x", "1.1.0.0/16", "-q", "5432",
		"-i", "10.0.0.0/8", "-b", "80,443",
	}},
}

// caseConfig parses a case's flags exactly as the CLI does (policy.ParseArgs: policy.Flags
// over policy.Default, no environment).
func caseConfig(tb testing.TB, args []string) *policy.Config {
	tb.Helper()
	cfg, err := policy.ParseArgs(policy.Default(), append(append([]string{}, referenceArgs...), args...)...)
	if err != nil {
		tb.Fatalf("config %q: %v", args, err)
	}
	return &cfg
}
