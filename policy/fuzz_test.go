package policy_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/meshdivert/divert/policy"
)

// fuzzFlags are the policy flags in the order the fuzzer picks them by index.
var fuzzFlags = []string{
	policy.FlagProxyPort, policy.FlagInboundCapturePort, policy.FlagInboundTunnelPort,
	policy.FlagProxyUID, policy.FlagProxyGID, policy.FlagMode, policy.FlagTProxyMark,
	policy.FlagTProxyRouteTable, policy.FlagInboundPorts, policy.FlagInboundExcludePorts,
	policy.FlagOutboundPorts, policy.FlagOutboundExcludePorts, policy.FlagOutboundCIDRs,
	policy.FlagOutboundExcludeCIDRs, policy.FlagDualStack,
}

// FuzzFlags gives one flag a value on the command line and another one a value through its
// istio-iptables environment variable, the two ways a pod passes settings. Whatever the
// values:
//   - an accepted Config validates, and rendering it as flags (Args) parses back to the
//     same Config (and renders the same again): nothing downstream sees a setting that
//     the CLI could not have written;
//   - a refusal is one line that names a flag that was given (-x/--name), so the user
//     knows which setting to fix.
func FuzzFlags(f *testing.F) {
	for _, s := range []struct {
		flag    uint8
		value   string
		env     uint8
		envVal  string
		comment string
	}{
		{0, "15001", 1, "15006", "defaults"},
		{0, "15006", 1, "", "-p equals -z"},
		{8, "*", 9, "15090,15021,15020", "istio's inbound"},
		{8, "80, 443 ,", 10, "3306 5432", "spaces: inside an item is refused"},
		{12, "10.0.0.0/8,192.168.1.1", 13, "10.1.2.3/8", "CIDRs, bare address, unmasked"},
		{12, "*", 13, "::1/128", "IPv6 exclusion"},
		{12, "::ffff:10.0.0.0/104", 13, "", "v4-mapped refused"},
		{14, "true", 12, "fd00::/129,10.0.0.0/8", "dual stack, /129"},
		{5, "tproxy", 6, "4294967295", "mode lower case, max mark"},
		{5, "NAT", 3, "-1", "bad mode"},
		{3, "4294967296", 4, "0", "uid overflow"},
		{0, "0", 2, "65536", "port 0 and overflow"},
		{11, "1,\n2", 12, "fe80::1%eth0", "newline, zone"},
		{9, ",,,", 8, "", "empty lists"},
		{13, "0.0.0.0/0", 12, "", "-x everything, -i nothing"},
		{4, " 7 ", 0, "+80", "trimmed, signed"},
	} {
		f.Add(s.flag, s.value, s.env, s.envVal)
	}
	f.Fuzz(func(t *testing.T, flagIdx uint8, value string, envIdx uint8, envVal string) {
		flag := fuzzFlags[int(flagIdx)%len(fuzzFlags)]
		envFlag := fuzzFlags[int(envIdx)%len(fuzzFlags)]
		args := []string{"--" + flag + "=" + value}
		env := map[string]string{policy.EnvVar(envFlag): envVal}
		cfg, err := parse(args, env)
		if err != nil {
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Fatalf("refusal of --%s=%q, $%s=%q is not one line: %q", flag, value, policy.EnvVar(envFlag), envVal, msg)
			}
			if !namesFlag(msg, flag) && !namesFlag(msg, envFlag) {
				t.Fatalf("refusal of --%s=%q, $%s=%q names neither flag: %q", flag, value, policy.EnvVar(envFlag), envVal, msg)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("accepted --%s=%q, $%s=%q but it does not validate: %v", flag, value, policy.EnvVar(envFlag), envVal, err)
		}
		rendered := cfg.Args()
		again, err := parse(rendered, nil)
		if err != nil {
			t.Fatalf("accepted --%s=%q, $%s=%q, rendered as %q, which is refused: %v", flag, value, policy.EnvVar(envFlag), envVal, rendered, err)
		}
		if !reflect.DeepEqual(normalize(cfg), normalize(again)) {
			t.Fatalf("round trip of --%s=%q, $%s=%q through %q:\n got %+v\nwant %+v", flag, value, policy.EnvVar(envFlag), envVal, rendered, again, cfg)
		}
		if r2 := again.Args(); !reflect.DeepEqual(rendered, r2) {
			t.Fatalf("rendering is not stable: %q then %q", rendered, r2)
		}
	})
}

// namesFlag reports whether msg names --flag itself, not a longer flag it prefixes.
func namesFlag(msg, flag string) bool {
	for rest := msg; ; {
		i := strings.Index(rest, "--"+flag)
		if i < 0 {
			return false
		}
		rest = rest[i+2+len(flag):]
		if rest == "" || !strings.ContainsAny(rest[:1], "abcdefghijklmnopqrstuvwxyz-") {
			return true
		}
	}
}

// normalize makes empty and nil lists equal: both mean "none" to every backend.
func normalize(c policy.Config) policy.Config {
	if len(c.InboundPorts.Ports) == 0 {
		c.InboundPorts.Ports = nil
	}
	if len(c.InboundExcludePorts) == 0 {
		c.InboundExcludePorts = nil
	}
	if len(c.OutboundPorts) == 0 {
		c.OutboundPorts = nil
	}
	if len(c.OutboundExcludePorts) == 0 {
		c.OutboundExcludePorts = nil
	}
	if len(c.OutboundCIDRs.Prefixes) == 0 {
		c.OutboundCIDRs.Prefixes = nil
	}
	if len(c.OutboundExcludeCIDRs) == 0 {
		c.OutboundExcludeCIDRs = nil
	}
	return c
}
