package iptables

// Privileged tests: they need root, iptables-nft and iptables-legacy, and fail (never
// skip) when something is missing, so CI cannot pass without exercising the kernel.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testutil"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

var backends = []Backend{BackendNFT, BackendLegacy}

// newNetNS creates a throwaway named netns with lo up (like a pod's) and removes it when
// the test ends, whatever happened.
func newNetNS(tb testing.TB) string {
	tb.Helper()
	testutil.RequirePrivileged(tb)
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	name := "dvt-ipt-" + hex.EncodeToString(rnd[:])
	errc := make(chan error, 1)
	// NewNamed moves the calling thread into the new netns: do it on a throwaway locked
	// thread and come back, so no test goroutine ever runs in the wrong namespace.
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if err != nil {
			errc <- err
			return
		}
		ns.Close()
		if err := netns.Set(orig); err != nil {
			errc <- err // the thread stays locked and dies with the goroutine
			return
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	err := <-errc
	tb.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil && !os.IsNotExist(err) {
			tb.Errorf("delete netns %s: %v", name, err)
		}
	})
	if err != nil {
		tb.Fatalf("create netns %s: %v", name, err)
	}
	path := filepath.Join("/run/netns", name)
	err = withHandle(path, func(h *netlink.Handle, _ int) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		return h.LinkSetUp(lo)
	})
	if err != nil {
		tb.Fatalf("set lo up in %s: %v", path, err)
	}
	return path
}

func mustTool(tb testing.TB, b Backend, f ...policy.Family) tool {
	tb.Helper()
	fam := policy.IPv4
	if len(f) > 0 {
		fam = f[0]
	}
	t, ok := findTool(b, fam)
	if !ok {
		tb.Fatalf("%s-%s-restore/-save not found: install the iptables package", binary(fam), b)
	}
	return t
}

func restore(tb testing.TB, b Backend, ns, input string, f ...policy.Family) {
	tb.Helper()
	if _, err := run(context.Background(), ns, input, mustTool(tb, b, f...).restore, "--noflush", "-w"); err != nil {
		tb.Fatalf("restore %q: %v", input, err)
	}
}

func dump(tb testing.TB, b Backend, ns string, f ...policy.Family) map[string]*savedTable {
	tb.Helper()
	state, err := mustTool(tb, b, f...).dump(context.Background(), ns)
	if err != nil {
		tb.Fatal(err)
	}
	return state
}

var allTables = []string{"filter", tableMangle, tableNat, "raw", "security"}

// istioState is the part of a dump istio owns as this package sees it, in iptables-save's
// canonical order: ISTIO_ chain names and rules, and istio's rules in the kernel's chains.
func istioState(state map[string]*savedTable) []string {
	var out []string
	for _, t := range allTables {
		st := state[t]
		if st == nil {
			continue
		}
		for _, c := range st.chains {
			if strings.HasPrefix(c, chainPrefix) {
				out = append(out, t+" :"+c)
			}
		}
		marks := istioMarks(st)
		for _, r := range st.rules {
			if strings.HasPrefix(r.chain, chainPrefix) || isBuiltinChain(r.chain) && ownedBuiltinRule(t, r, marks) {
				out = append(out, t+" "+r.line)
			}
		}
	}
	return out
}

// allState is every user chain and rule of a dump, in iptables-save's order.
func allState(state map[string]*savedTable) []string {
	var out []string
	for _, t := range allTables {
		if st := state[t]; st != nil {
			for _, c := range st.chains {
				out = append(out, t+" :"+c)
			}
			for _, r := range st.rules {
				out = append(out, t+" "+r.line)
			}
		}
	}
	return out
}

// without removes one occurrence of each of drop from lines, keeping the order. Used to
// find what else a dump holds, independently of how this package recognises istio rules.
func without(lines, drop []string) []string {
	count := map[string]int{}
	for _, l := range drop {
		count[l]++
	}
	var out []string
	for _, l := range lines {
		if count[l] > 0 {
			count[l]--
			continue
		}
		out = append(out, l)
	}
	return out
}

// oracle feeds istio's own restore text to iptables-restore (ip6tables-restore for
// IPv6) in a fresh netns and returns what the kernel then holds: what Apply must reproduce.
func oracle(tb testing.TB, b Backend, input string, f ...policy.Family) []string {
	tb.Helper()
	if input == "" {
		return nil
	}
	ns := newNetNS(tb)
	restore(tb, b, ns, input, f...)
	return istioState(dump(tb, b, ns, f...))
}

// predicted is what saveForm says iptables-save prints for rs.
func predicted(rs ruleSet) []string {
	var out []string
	for _, t := range []string{tableMangle, tableNat, tableRaw} {
		chains := rs.chains(t)
		slices.Sort(chains) // iptables-save lists chains by name
		for _, c := range chains {
			out = append(out, t+" :"+c)
		}
		contents := rs.contents(t)
		for _, c := range []string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"} {
			for _, l := range contents[c] {
				out = append(out, t+" "+l)
			}
		}
		for _, c := range chains {
			for _, l := range contents[c] {
				out = append(out, t+" "+l)
			}
		}
	}
	return out
}

// foreignRules6 are foreignRules for ip6tables.
const foreignRules6 = `*nat
:FOREIGN - [0:0]
-A OUTPUT -p tcp --dport 9999 -j RETURN
-A PREROUTING -p tcp --dport 9999 -j FOREIGN
-A FOREIGN -j RETURN
COMMIT
*mangle
-A OUTPUT -p tcp -o lo -m mark --mark 7 -j RETURN
COMMIT
`

// foreignRules are rules of other software that Apply and Cleanup must leave alone, in the
// kernel's chains of both tables istio uses and in a chain of their own.
const foreignRules = `*nat
:FOREIGN - [0:0]
-A OUTPUT -p tcp --dport 9999 -j RETURN
-A PREROUTING -p tcp --dport 9999 -j FOREIGN
-A FOREIGN -j RETURN
COMMIT
*mangle
-A OUTPUT -p tcp -o lo -m mark --mark 7 -j RETURN
-A PREROUTING -p udp -j MARK --set-mark 7
COMMIT
`

func diffLines(tb testing.TB, what string, want, got []string) {
	tb.Helper()
	if !slices.Equal(want, got) {
		tb.Errorf("%s differ:\nwant:\n  %s\ngot:\n  %s", what, strings.Join(want, "\n  "), strings.Join(got, "\n  "))
	}
}

// TestApplyReference applies the default config and checks the kernel holds exactly what
// istio's reference restore input produces; re-applying changes nothing; Cleanup removes
// every trace and nothing else; a second Cleanup is a no-op.
func TestApplyReference(t *testing.T) {
	ctx := context.Background()
	ref, err := os.ReadFile(filepath.Join("testdata", "reference-default.rules"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := caseConfig(t, nil)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			ns := newNetNS(t)
			restore(t, b, ns, foreignRules)
			foreign := allState(dump(t, b, ns))

			res, err := Options{Backend: b}.Apply(ctx, ns, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if res.Backend != b || !res.Changed || res.Input == "" || res.TProxyRoute {
				t.Errorf("first Apply: %+v", res)
			}
			after := dump(t, b, ns)
			diffLines(t, "istio rules after Apply vs reference", oracle(t, b, string(ref)), istioState(after))
			diffLines(t, "saveForm prediction vs kernel", predicted(rules(cfg, policy.IPv4)), istioState(after))
			diffLines(t, "foreign rules after Apply", foreign, without(allState(after), predicted(rules(cfg, policy.IPv4))))

			res, err = Options{Backend: b}.Apply(ctx, ns, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if res.Changed || res.Input != "" {
				t.Errorf("re-Apply changed something: %+v", res)
			}
			diffLines(t, "iptables-save after re-Apply", istioState(after), istioState(dump(t, b, ns)))

			if err := (Options{Backend: b}).Cleanup(ctx, ns); err != nil {
				t.Fatal(err)
			}
			clean := dump(t, b, ns)
			if s := istioState(clean); len(s) > 0 {
				t.Errorf("Cleanup left istio rules:\n  %s", strings.Join(s, "\n  "))
			}
			diffLines(t, "everything after Cleanup", foreign, allState(clean))
			if err := (Options{Backend: b}).Cleanup(ctx, ns); err != nil {
				t.Fatalf("second Cleanup: %v", err)
			}
			diffLines(t, "everything after second Cleanup", foreign, allState(dump(t, b, ns)))
		})
	}
}

// TestApplyCases applies every golden case in turn to one netns (so each Apply also moves
// from the previous case's rules, REDIRECT↔TPROXY included) and checks the kernel holds
// what istio's rendering of that case produces in a fresh netns.
func TestApplyCases(t *testing.T) {
	ctx := context.Background()
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			ns := newNetNS(t)
			restore(t, b, ns, foreignRules)
			foreign := allState(dump(t, b, ns))
			restore(t, b, ns, foreignRules6, policy.IPv6)
			foreign6 := allState(dump(t, b, ns, policy.IPv6))
			for _, tc := range cases {
				cfg := caseConfig(t, tc.args, tc.pod...)
				if _, err := (Options{Backend: b}).Apply(ctx, ns, cfg); err != nil {
					t.Fatalf("%s: %v", tc.name, err)
				}
				got := istioState(dump(t, b, ns))
				diffLines(t, tc.name+": istio rules vs istio's own rendering", oracle(t, b, Render(cfg)), got)
				diffLines(t, tc.name+": saveForm prediction vs kernel", predicted(rules(cfg, policy.IPv4)), got)
				// IPv6: istio's IPv6 rules when it writes them, else none (an earlier
				// case's are removed).
				got6 := istioState(dump(t, b, ns, policy.IPv6))
				diffLines(t, tc.name+": ip6tables istio rules vs istio's own rendering", oracle(t, b, Render6(cfg), policy.IPv6), got6)
				var want6 ruleSet
				if cfg.IPv6 {
					want6 = rules(cfg, policy.IPv6)
				}
				diffLines(t, tc.name+": ip6tables saveForm prediction vs kernel", predicted(want6), got6)
				res, err := Options{Backend: b}.Apply(ctx, ns, cfg)
				if err != nil {
					t.Fatalf("%s: re-Apply: %v", tc.name, err)
				}
				if res.Changed {
					t.Errorf("%s: re-Apply changed something: %+v", tc.name, res)
				}
				diffLines(t, tc.name+": foreign rules", foreign, without(allState(dump(t, b, ns)), predicted(rules(cfg, policy.IPv4))))
				diffLines(t, tc.name+": foreign ip6tables rules", foreign6, without(allState(dump(t, b, ns, policy.IPv6)), predicted(want6)))
				if t.Failed() {
					return
				}
			}
			if err := (Options{Backend: b}).Cleanup(ctx, ns); err != nil {
				t.Fatal(err)
			}
			diffLines(t, "everything after Cleanup (IPv6)", foreign6, allState(dump(t, b, ns, policy.IPv6)))
			if err := (Options{Backend: b}).Cleanup(ctx, ns); err != nil {
				t.Fatal(err)
			}
			diffLines(t, "everything after Cleanup", foreign, allState(dump(t, b, ns)))
		})
	}
}

type routeState struct {
	rules  []string // "fwmark lookup table"
	routes []string // local default routes via lo, by table
}

func routes(tb testing.TB, ns string) routeState {
	tb.Helper()
	var s routeState
	err := withHandle(ns, func(h *netlink.Handle, lo int) error {
		rules, err := h.RuleList(netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, r := range rules {
			if r.Mark != 0 {
				s.rules = append(s.rules, "fwmark "+u32(r.Mark)+" lookup "+u32(uint32(r.Table)))
			}
		}
		all, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		for _, r := range all {
			if r.Type == unix.RTN_LOCAL && r.LinkIndex == lo && isDefault(r.Dst) {
				s.routes = append(s.routes, "local default dev lo table "+u32(uint32(r.Table)))
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// TestApplyTProxyRoute checks istio's policy route comes and goes with TPROXY mode, moves
// with -t/-r, survives re-Apply unchanged, and that a foreign fwmark rule stays.
func TestApplyTProxyRoute(t *testing.T) {
	ctx := context.Background()
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			ns := newNetNS(t)
			// Someone else's fwmark rule (to main, which has no local default route).
			err := withHandle(ns, func(h *netlink.Handle, _ int) error {
				r := netlink.NewRule()
				r.Family, r.Mark, r.Table = netlink.FAMILY_V4, 7, unix.RT_TABLE_MAIN
				return h.RuleAdd(r)
			})
			if err != nil {
				t.Fatal(err)
			}
			foreign := "fwmark 7 lookup 254"
			check := func(step string, wantRules, wantRoutes []string) {
				t.Helper()
				got := routes(t, ns)
				diffLines(t, step+": ip rules", append(wantRules, foreign), sorted(got.rules))
				diffLines(t, step+": local routes", wantRoutes, got.routes)
			}
			opts := Options{Backend: b}

			res, err := opts.Apply(ctx, ns, caseConfig(t, []string{"-m", "TPROXY"}))
			if err != nil {
				t.Fatal(err)
			}
			if !res.TProxyRoute || !res.Changed {
				t.Errorf("TPROXY Apply: %+v", res)
			}
			check("tproxy", []string{"fwmark 1337 lookup 133"}, []string{"local default dev lo table 133"})

			res, err = opts.Apply(ctx, ns, caseConfig(t, []string{"-m", "TPROXY"}))
			if err != nil {
				t.Fatal(err)
			}
			if res.Changed {
				t.Errorf("re-Apply changed something: %+v", res)
			}
			check("tproxy again", []string{"fwmark 1337 lookup 133"}, []string{"local default dev lo table 133"})

			if _, err := opts.Apply(ctx, ns, caseConfig(t, []string{"-m", "TPROXY", "-t", "1400", "-r", "140"})); err != nil {
				t.Fatal(err)
			}
			check("tproxy -t 1400 -r 140", []string{"fwmark 1400 lookup 140"}, []string{"local default dev lo table 140"})

			if _, err := opts.Apply(ctx, ns, caseConfig(t, nil)); err != nil {
				t.Fatal(err)
			}
			check("back to REDIRECT", nil, nil)

			if _, err := opts.Apply(ctx, ns, caseConfig(t, []string{"-m", "TPROXY"})); err != nil {
				t.Fatal(err)
			}
			if err := opts.Cleanup(ctx, ns); err != nil {
				t.Fatal(err)
			}
			check("cleanup", nil, nil)
			if s := istioState(dump(t, b, ns)); len(s) > 0 {
				t.Errorf("Cleanup left istio rules:\n  %s", strings.Join(s, "\n  "))
			}
			if err := opts.Cleanup(ctx, ns); err != nil {
				t.Fatalf("second Cleanup: %v", err)
			}
			check("second cleanup", nil, nil)
		})
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// TestBackendDetection: auto prefers nft, but follows the rules to legacy when only legacy
// holds ISTIO_ chains; auto Cleanup cleans both.
func TestBackendDetection(t *testing.T) {
	ctx := context.Background()
	cfg := caseConfig(t, nil)
	ns := newNetNS(t)
	res, err := Apply(ctx, ns, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Backend != BackendNFT {
		t.Errorf("auto picked %s in a fresh netns, want nft", res.Backend)
	}
	if err := Cleanup(ctx, ns); err != nil {
		t.Fatal(err)
	}

	restore(t, BackendLegacy, ns, Render(cfg)) // as a legacy istio-init would have left it
	res, err = Apply(ctx, ns, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Backend != BackendLegacy || res.Changed {
		t.Errorf("auto re-Apply over legacy istio rules: %+v, want legacy and no change", res)
	}
	restore(t, BackendNFT, ns, Render(cfg)) // and now both hold them
	if err := Cleanup(ctx, ns); err != nil {
		t.Fatal(err)
	}
	for _, b := range backends {
		if s := istioState(dump(t, b, ns)); len(s) > 0 {
			t.Errorf("auto Cleanup left %s rules:\n  %s", b, strings.Join(s, "\n  "))
		}
	}
}

// TestApplySwitchesBackend: applying with one backend over istio's rules in the other (a
// forced backend, or auto where both hold them) leaves the rules in the applying backend
// only, and says which it removed.
func TestApplySwitchesBackend(t *testing.T) {
	ctx := context.Background()
	cfg := caseConfig(t, nil)
	for _, c := range []struct{ from, to Backend }{{BackendNFT, BackendLegacy}, {BackendLegacy, BackendNFT}} {
		t.Run(string(c.from)+"-to-"+string(c.to), func(t *testing.T) {
			ns := newNetNS(t)
			if _, err := (Options{Backend: c.from}).Apply(ctx, ns, cfg); err != nil {
				t.Fatal(err)
			}
			res, err := Options{Backend: c.to}.Apply(ctx, ns, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if res.Backend != c.to || !slices.Equal(res.Removed, []Backend{c.from}) || !res.Changed {
				t.Errorf("apply with %s over %s rules: %+v, want %s with %s removed", c.to, c.from, res, c.to, c.from)
			}
			if s := istioState(dump(t, c.from, ns)); len(s) > 0 {
				t.Errorf("%s still holds istio's rules:\n  %s", c.from, strings.Join(s, "\n  "))
			}
			if s := istioState(dump(t, c.to, ns)); len(s) == 0 {
				t.Errorf("%s holds no istio rules", c.to)
			}
			if got, err := Installed(ctx, ns); err != nil || !slices.Equal(got, []Backend{c.to}) {
				t.Errorf("Installed: %v %v, want [%s]", got, err, c.to)
			}
		})
	}
	// auto where both hold them keeps nft's.
	ns := newNetNS(t)
	restore(t, BackendLegacy, ns, Render(cfg))
	restore(t, BackendNFT, ns, Render(cfg))
	res, err := Apply(ctx, ns, cfg)
	if err != nil || res.Backend != BackendNFT || !slices.Equal(res.Removed, []Backend{BackendLegacy}) {
		t.Errorf("auto over both: %+v %v, want nft with legacy removed", res, err)
	}
	if err := Cleanup(ctx, ns); err != nil {
		t.Fatal(err)
	}
}

// TestApplyErrors: failures are one line that says what to do.
func TestApplyErrors(t *testing.T) {
	_, err := Apply(context.Background(), "/run/netns/dvt-ipt-does-not-exist", caseConfig(t, nil))
	if err == nil || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "dvt-ipt-does-not-exist") {
		t.Errorf("Apply on a missing netns: %v", err)
	}
	t.Setenv("PATH", t.TempDir())
	saved := sbinDirs
	sbinDirs = nil
	defer func() { sbinDirs = saved }()
	_, err = Apply(context.Background(), newNetNS(t), caseConfig(t, nil))
	if err == nil || !strings.Contains(err.Error(), "install the iptables package") {
		t.Errorf("Apply without iptables: %v", err)
	}
}
