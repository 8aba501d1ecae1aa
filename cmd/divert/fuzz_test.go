package main

import (
	"io"
	"strings"
	"testing"
)

// FuzzIstioSettings gives one of istio-iptables' non-policy settings (honoured or refused)
// a value, by flag or by one of its environment variables, and resolves them as
// `divert istio-iptables` does before acting. A refusal is one line naming the setting as
// it was given (--flag or $VAR); an accepted refused-kind setting is at its "off" value,
// and an accepted boolean is true or false.
func FuzzIstioSettings(f *testing.F) {
	for i, o := range istioOpts {
		f.Add(uint8(i), o.def, false, uint8(0))
		f.Add(uint8(i), "1", true, uint8(1))
	}
	f.Add(uint8(0), "yes", true, uint8(0))
	f.Add(uint8(17), "eth0\neth1", false, uint8(0))
	f.Add(uint8(10), " \t", true, uint8(0))
	f.Fuzz(func(t *testing.T, idx uint8, value string, viaEnv bool, envIdx uint8) {
		o := istioOpts[int(idx)%len(istioOpts)]
		cmd := newIstioIptablesCmd(env{stdout: io.Discard, stderr: io.Discard, getenv: func(string) string { return "" }})
		fs := cmd.Flags()
		env := map[string]string{}
		given := ""
		if viaEnv || o.envOnly {
			name := o.env[int(envIdx)%len(o.env)]
			env[name], given = value, "$"+name
		} else {
			if err := fs.Parse([]string{"--" + o.name + "=" + value}); err != nil {
				return // pflag's own refusal of a bool that is no bool
			}
			given = "--" + o.name
		}
		s, err := resolveIstioOpts(fs, func(k string) string { return env[k] })
		if err != nil {
			if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, given) {
				t.Fatalf("%s=%q refused with %q: want one line naming %s", given, value, msg, given)
			}
			return
		}
		got := s.values[o.name]
		if o.isBool && got != "true" && got != "false" {
			t.Fatalf("%s=%q accepted as %q, not a boolean", given, value, got)
		}
		if o.support == rejected && strings.TrimSpace(got) != o.def {
			t.Fatalf("%s=%q (not supported) accepted as %q", given, value, got)
		}
	})
}
