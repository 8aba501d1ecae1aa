package iptables

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshdivert/divert/policy"
)

// TestRenderGolden pins the rendering of every case; UPDATE_GOLDEN=1 rewrites the files.
func TestRenderGolden(t *testing.T) {
	update := os.Getenv("UPDATE_GOLDEN") != ""
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := RenderAll(caseConfig(t, tc.args, tc.pod...))
			path := filepath.Join("testdata", tc.name+".golden")
			if update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run UPDATE_GOLDEN=1 go test ./iptables/ to create it)", err)
			}
			if got != string(want) {
				t.Errorf("Render differs from %s (UPDATE_GOLDEN=1 rewrites it):\n%s", path, lineDiff(string(want), got))
			}
		})
	}
}

// TestRenderReference: the default case is byte for byte what istio-iptables hands to
// iptables-restore (shared/reference, copied into testdata).
func TestRenderReference(t *testing.T) {
	want, err := os.ReadFile(filepath.Join("testdata", "reference-default.rules"))
	if err != nil {
		t.Fatal(err)
	}
	if got := Render(caseConfig(t, nil)); got != string(want) {
		t.Errorf("Render(default) differs from istio's output:\n%s", lineDiff(string(want), got))
	}
}

// TestRenderDNSReference: DNS capture is byte for byte what istio-iptables hands to
// iptables-restore (shared/reference: dns.rules, dns-capture-all.rules, and the IPv4 part of
// dual-stack-dns-exclusions.rules). Those files were captured from istio's dry run, which
// heads the input with a comment and writes "*nat" where reference-default.rules (the
// restore input itself) has "* nat"; only that header differs, the rules are compared as is.
func TestRenderDNSReference(t *testing.T) {
	for file, args := range map[string][]string{
		"reference-dns.rules":                 {"--redirect-dns", "--dns-servers", "10.96.0.10"},
		"reference-dns-capture-all.rules":     {"--redirect-dns", "--capture-all-dns"},
		"reference-dns-exclusions-ipv4.rules": {"--redirect-dns", "--dns-servers", "10.96.0.10", "-x", "10.0.0.0/8", "-o", "3306"},
	} {
		t.Run(file, func(t *testing.T) {
			want := referenceRules(t, file)
			if got := Render(caseConfig(t, args)); got != want {
				t.Errorf("Render(%q) differs from istio's output:\n%s", args, lineDiff(want, got))
			}
		})
	}
}

// TestRenderIPv6Reference: with IPv6 the two inputs, iptables-restore's then
// ip6tables-restore's, are byte for byte what istio-iptables hands to each (shared/reference:
// ipv6.rules, dual-stack.rules, dual-stack-dns-exclusions.rules, whose headers RenderAll
// writes too); only "*nat" is "* nat" in the restore input itself, as in
// TestRenderDNSReference.
func TestRenderIPv6Reference(t *testing.T) {
	for _, name := range []string{"ipv6", "dual-stack", "dual-stack-dns-exclusions"} {
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join("testdata", "reference-"+name+".rules"))
			if err != nil {
				t.Fatal(err)
			}
			want := spacedTables(string(raw))
			tc := caseByName(t, name)
			cfg := caseConfig(t, tc.args, tc.pod...)
			if !cfg.IPv6 {
				t.Fatalf("case %s (pod %v) does not capture IPv6", name, tc.pod)
			}
			if got := RenderAll(cfg); got != want {
				t.Errorf("RenderAll(%s) differs from istio's output:\n%s", name, lineDiff(want, got))
			}
			v4, v6, _ := strings.Cut(want, header6)
			if got := header4 + Render(cfg); got != v4 {
				t.Errorf("Render(%s) differs from istio's IPv4 part:\n%s", name, lineDiff(v4, got))
			}
			if got := Render6(cfg); got != v6 {
				t.Errorf("Render6(%s) differs from istio's IPv6 part:\n%s", name, lineDiff(v6, got))
			}
		})
	}
	// Without IPv6 there is no ip6tables input, and RenderAll is Render.
	cfg := caseConfig(t, nil, dualStackPod...)
	if cfg.IPv6 || Render6(cfg) != "" || RenderAll(cfg) != Render(cfg) {
		t.Errorf("a dual-stack pod without --dual-stack: IPv6 %v, Render6 %q", cfg.IPv6, Render6(cfg))
	}
}

// spacedTables writes istio's dry-run "*nat" as its restore input's "* nat".
func spacedTables(s string) string {
	var lines []string
	for _, l := range strings.SplitAfter(s, "\n") {
		if strings.HasPrefix(l, "*") && !strings.HasPrefix(l, "* ") {
			l = "* " + l[1:]
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "")
}

// referenceRules reads a testdata file of istio's rules as Render writes them: without the
// "# iptables-restore" comment lines, and "* nat" for "*nat" (spacedTables).
func referenceRules(tb testing.TB, file string) string {
	tb.Helper()
	raw, err := os.ReadFile(filepath.Join("testdata", file))
	if err != nil {
		tb.Fatal(err)
	}
	var lines []string
	for _, l := range strings.SplitAfter(string(raw), "\n") {
		if !strings.HasPrefix(l, "# iptables-restore") {
			lines = append(lines, l)
		}
	}
	return spacedTables(strings.Join(lines, ""))
}

func caseByName(tb testing.TB, name string) renderCase {
	tb.Helper()
	for _, c := range cases {
		if c.name == name {
			return c
		}
	}
	tb.Fatalf("no case %q", name)
	return renderCase{}
}

// TestGoldenFilesHaveCases catches a golden file left behind by a renamed case.
func TestGoldenFilesHaveCases(t *testing.T) {
	names := map[string]bool{}
	for _, tc := range cases {
		if names[tc.name] {
			t.Errorf("case %q twice", tc.name)
		}
		names[tc.name] = true
	}
	files, _ := filepath.Glob(filepath.Join("testdata", "*.golden"))
	for _, f := range files {
		if name := strings.TrimSuffix(filepath.Base(f), ".golden"); !names[name] {
			t.Errorf("%s has no case in the table", f)
		}
	}
}

// lineDiff is a minimal line-by-line diff, enough to read a golden mismatch.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for i := 0; i < len(w) || i < len(g); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			b.WriteString("line " + itoa(i+1) + ":\n  want: " + wl + "\n  got:  " + gl + "\n")
		}
	}
	return b.String()
}

func itoa(i int) string { return u32(uint32(i)) }

// TestRenderSettingsReference: owner groups, -c and --drop-invalid are byte for byte what
// istio-iptables hands to iptables-restore (shared/reference, made by istio's own code with
// the injector's flags), and -k what istio's own golden files hold (istio/istio at 86c9f01,
// tools/istio-iptables/pkg/capture/testdata, the restore part: those start from
// istio-iptables' defaults, not the injector's).
func TestRenderSettingsReference(t *testing.T) {
	for file, tc := range map[string]struct {
		injector bool
		args     []string
	}{
		"reference-owner-groups-include.rules":                {true, []string{"--istio-outbound-owner-groups", "1000,2000"}},
		"reference-owner-groups-exclude.rules":                {true, []string{"--istio-outbound-owner-groups-exclude", "3000"}},
		"reference-exclude-interfaces.rules":                  {true, []string{"-c", "net1"}},
		"reference-drop-invalid.rules":                        {true, []string{"--drop-invalid"}},
		"istio-golden-kube-virt-interfaces.rules":             {false, []string{"-k", "eth1,eth2", "-i", "*"}},
		"istio-golden-ipnets-with-kube-virt-interfaces.rules": {false, []string{"-k", "eth1,eth2", "-i", "10.0.0.0/8"}},
	} {
		t.Run(file, func(t *testing.T) {
			want := referenceRules(t, file)
			cfg := caseConfig(t, tc.args)
			if !tc.injector {
				c, err := policy.ParseArgs(policy.IstioIptablesDefaults(), tc.args...)
				if err != nil {
					t.Fatal(err)
				}
				cfg = &c
			}
			if got := Render(cfg); got != want {
				t.Errorf("Render(%q) differs from istio's output:\n%s", tc.args, lineDiff(want, got))
			}
		})
	}
}

// TestRenderKubeVirtIPv6Reference: -k on an IPv6 pod is what istio's own golden files hold
// for both families (ipv6-virt-interfaces, ipv6-ipnets; istio-iptables' defaults).
func TestRenderKubeVirtIPv6Reference(t *testing.T) {
	for name, args := range map[string][]string{
		"ipv6-virt-interfaces": {"-b", "4000,5000", "-k", "eth0,eth1"},
		"ipv6-ipnets":          {"-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1", "-x", "2001:db8::/32", "-i", "2001:db8::/32"},
	} {
		t.Run(name, func(t *testing.T) {
			cfg, err := policy.ParseArgs(policy.IstioIptablesDefaults(), args...)
			if err != nil {
				t.Fatal(err)
			}
			cfg.DecideIPv6([]netip.Addr{netip.MustParseAddr("fd00:10:244::5")})
			for part, got := range map[string]string{"v4": Render(&cfg), "v6": Render6(&cfg)} {
				want, err := os.ReadFile(filepath.Join("testdata", "istio-golden-"+name+"-"+part+".rules"))
				if err != nil {
					t.Fatal(err)
				}
				if got != string(want) {
					t.Errorf("%s %s differs from istio's output:\n%s", name, part, lineDiff(string(want), got))
				}
			}
		})
	}
}
