package iptables

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/meshdivert/divert/policy"
)

// Options tune Apply and Cleanup. The zero value detects everything.
type Options struct {
	// Backend forces iptables-nft or iptables-legacy; BackendAuto detects (see BackendAuto).
	Backend Backend
}

// Result says what Apply did.
type Result struct {
	// Backend is the iptables implementation that holds the rules.
	Backend Backend
	// Restore is the iptables-restore binary that ran; "" when the netns was up to date.
	Restore string
	// Input is what was fed to `iptables-restore --noflush`; "" when nothing ran.
	Input string
	// Restore6 and Input6 are the same for ip6tables-restore: the IPv6 rules, or the removal
	// of IPv6 rules an earlier config wrote.
	Restore6, Input6 string
	// IPv6 is true when the IPv6 rules are in place (the config captures IPv6).
	IPv6 bool
	// Changed is false when the rules and routes were already exactly as configured.
	Changed bool
	// Removed are the other backends whose istio chains and rules this apply removed: a
	// netns holds istio's rules in one backend, never both (both would capture).
	Removed []Backend
	// TProxyRoute is true when the TPROXY policy route (ip rule fwmark <mark> lookup
	// <table>; local 0.0.0.0/0 dev lo table <table>, and ::/0 with IPv6) is in place.
	TProxyRoute bool
}

// Apply installs istio-iptables' rules for cfg in the network namespace at netnsPath with
// the detected backend. See Options.Apply.
func Apply(ctx context.Context, netnsPath string, cfg *policy.Config) (Result, error) {
	return Options{}.Apply(ctx, netnsPath, cfg)
}

// Cleanup removes istio's rules from the network namespace at netnsPath. See
// Options.Cleanup.
func Cleanup(ctx context.Context, netnsPath string) error {
	return Options{}.Cleanup(ctx, netnsPath)
}

// Apply installs istio-iptables' rules for cfg (the same rules RenderAll prints) in the
// network namespace at netnsPath.
//
// Each family's changes go in one `iptables-restore --noflush` (`ip6tables-restore`) run,
// which the kernel commits as a whole; IPv6 goes first, and is undone when IPv4 then fails,
// so a pod is never left with half of a new config. It is idempotent: the ISTIO_ chains are
// created or flushed and refilled in that run, the rules istio puts in the kernel's own
// chains (the jumps from PREROUTING and OUTPUT, TPROXY's mark rules) are added only if they
// are not already there in istio's order, and ISTIO_ chains or such rules left by other
// settings are removed (all IPv6 ones when cfg no longer captures IPv6); when everything is
// already in place nothing runs. Other rules are left alone. In TPROXY mode it also installs
// istio's policy route per family, and with IPv6 the ::6 address istio adds to lo; what it
// added is removed again if a later step fails.
func (o Options) Apply(ctx context.Context, netnsPath string, cfg *policy.Config) (Result, error) {
	if cfg == nil {
		return Result{}, errors.New("iptables: no config")
	}
	if err := cfg.Validate(); err != nil {
		return Result{}, err
	}
	c, err := o.pick(ctx, netnsPath)
	if err != nil {
		return Result{}, err
	}
	res := Result{Backend: c.backend, IPv6: cfg.IPv6}
	var undos []func() error
	undo := func() error {
		var errs []error
		for i := len(undos) - 1; i >= 0; i-- {
			errs = append(errs, undos[i]())
		}
		return errors.Join(errs...)
	}
	t6, err6 := c.ipv6()
	if cfg.IPv6 && err6 != nil {
		return res, fmt.Errorf("the pod's IPv6 is captured, but %w", err6)
	}

	changed := false
	for _, f := range []policy.Family{policy.IPv4, policy.IPv6} {
		if f == policy.IPv6 && err6 != nil {
			continue // no IPv6 here: nothing to sync
		}
		want := wantRoute(cfg, f)
		ch, u, err := syncRoutes(netnsPath, want, f)
		if err != nil {
			return res, errors.Join(err, undo())
		}
		changed, undos = changed || ch, append(undos, u)
		res.TProxyRoute = res.TProxyRoute || want != nil
	}
	if cfg.IPv6 {
		ch, u, err := addPassthrough6(netnsPath)
		if err != nil {
			return res, errors.Join(err, undo())
		}
		changed, undos = changed || ch, append(undos, u)
	}

	var input6 string
	switch {
	case cfg.IPv6:
		input6 = applyInput(cfg, policy.IPv6, c.state6)
	case err6 == nil:
		input6 = cleanupInput(c.state6) // IPv6 rules of an earlier config
	}
	if input6 != "" {
		if _, err := run(ctx, netnsPath, input6, t6.restore, "--noflush", "-w"); err != nil {
			return res, errors.Join(fmt.Errorf("apply ip6tables rules: %w", err), undo())
		}
		res.Restore6, res.Input6 = t6.restore, input6
		if !hasIstio(c.state6) {
			undos = append(undos, func() error { return t6.clean(ctx, netnsPath) })
		}
	}
	input := applyInput(cfg, policy.IPv4, c.state)
	if input != "" {
		if _, err := run(ctx, netnsPath, input, c.restore, "--noflush", "-w"); err != nil {
			return res, errors.Join(fmt.Errorf("apply iptables rules: %w", err), undo())
		}
		res.Restore, res.Input = c.restore, input
	}
	// The new rules are in before the other backend's go, so capture has no gap.
	for _, other := range o.othersHolding(ctx, netnsPath, c.backend) {
		if err := other.clean(ctx, netnsPath); err != nil {
			err = fmt.Errorf("istio's iptables-%s rules could not be removed: %w", other.backend, err)
			if c.holdsIstio() {
				return res, fmt.Errorf("rules applied with iptables-%s, but %w", c.backend, err)
			}
			// A switch of backend that cannot finish is undone: the old rules stay alone.
			return res, errors.Join(err, c.undoApply(ctx, netnsPath), undo())
		}
		res.Removed = append(res.Removed, other.backend)
	}
	res.Changed = input != "" || input6 != "" || changed || len(res.Removed) > 0
	return res, nil
}

// clean removes istio's chains and rules from the tool's tables, as they are now.
func (t tool) clean(ctx context.Context, netnsPath string) error {
	state, err := t.dump(ctx, netnsPath)
	if err != nil {
		return err
	}
	if input := cleanupInput(state); input != "" {
		_, err = run(ctx, netnsPath, input, t.restore, "--noflush", "-w")
	}
	return err
}

// clean removes istio's chains and rules from both families of the candidate's backend,
// as they were when it was found.
func (c candidate) clean(ctx context.Context, netnsPath string) error {
	var errs []error
	if input := cleanupInput(c.state); input != "" {
		if _, err := run(ctx, netnsPath, input, c.restore, "--noflush", "-w"); err != nil {
			errs = append(errs, fmt.Errorf("remove iptables-%s rules: %w", c.backend, err))
		}
	}
	if c.v6 != nil {
		if input := cleanupInput(c.state6); input != "" {
			if _, err := run(ctx, netnsPath, input, c.v6.restore, "--noflush", "-w"); err != nil {
				errs = append(errs, fmt.Errorf("remove ip6tables-%s rules: %w", c.backend, err))
			}
		}
	}
	return errors.Join(errs...)
}

// undoApply removes istio's rules from the candidate's backend again, both families.
func (c candidate) undoApply(ctx context.Context, netnsPath string) error {
	err := c.tool.clean(ctx, netnsPath)
	if c.v6 != nil {
		err = errors.Join(err, c.v6.clean(ctx, netnsPath))
	}
	return err
}

// othersHolding returns the backends other than b that hold istio's chains in the netns.
// A backend that does not work there holds nothing.
func (o Options) othersHolding(ctx context.Context, netnsPath string, b Backend) []candidate {
	cs, err := Options{}.candidates(ctx, netnsPath)
	if err != nil {
		return nil
	}
	var out []candidate
	for _, c := range cs {
		if c.backend != b && c.holdsIstio() {
			out = append(out, c)
		}
	}
	return out
}

// Installed returns the backends that hold istio's chains in the network namespace at
// netnsPath (none when no iptables is installed).
func Installed(ctx context.Context, netnsPath string) ([]Backend, error) {
	if !anyTables(netnsPath) {
		return nil, nil
	}
	cs, err := Options{}.candidates(ctx, netnsPath)
	if errors.Is(err, errNoIptables) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Backend
	for _, c := range cs {
		if c.holdsIstio() {
			out = append(out, c.backend)
		}
	}
	return out, nil
}

// Cleanup removes every ISTIO_ chain, the rules in the kernel's chains that jump into them
// and istio's TPROXY mark rules, in every table of both families, plus istio's TPROXY
// policy routes; other rules and routes are left alone, and so is ::6 on lo (as istio
// leaves it). Cleaning a clean netns changes nothing. With BackendAuto it cleans every
// backend that works in the netns, since rules may be in either.
func (o Options) Cleanup(ctx context.Context, netnsPath string) error {
	cs, err := o.candidates(ctx, netnsPath)
	if err != nil {
		return err
	}
	var errs []error
	ipv6 := false
	for _, c := range cs {
		errs = append(errs, c.clean(ctx, netnsPath))
		ipv6 = ipv6 || c.v6 != nil
	}
	if _, _, err := syncRoutes(netnsPath, nil, policy.IPv4); err != nil {
		errs = append(errs, err)
	}
	if ipv6 { // a kernel without IPv6 has no IPv6 route to remove
		if _, _, err := syncRoutes(netnsPath, nil, policy.IPv6); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// applyInput is the <ip6>tables-restore --noflush input that turns family f's tables in
// have into what cfg renders for f, or "" when they already are.
func applyInput(cfg *policy.Config, f policy.Family, have map[string]*savedTable) string {
	rs := rules(cfg, f)
	var b strings.Builder
	for _, table := range []string{tableMangle, tableNat, tableRaw} {
		marks := istioMarks(have[table])
		if cfg.Mode == policy.TProxy {
			marks[hexMark(u32(cfg.TProxyMark))] = true
		}
		b.WriteString(tableInput(table, rs, have[table], marks))
	}
	return b.String()
}

func tableInput(table string, rs ruleSet, have *savedTable, marks map[string]bool) string {
	if have == nil {
		have = &savedTable{}
	}
	chains := rs.chains(table)
	want := rs.contents(table)

	var stale []string
	for _, c := range have.chains {
		if strings.HasPrefix(c, chainPrefix) && !slices.Contains(chains, c) {
			stale = append(stale, c)
		}
	}
	haveRules := map[string][]string{} // ISTIO_ chains: all rules; kernel chains: istio's
	var owned []savedRule
	for _, r := range have.rules {
		switch {
		case !isBuiltinChain(r.chain):
			haveRules[r.chain] = append(haveRules[r.chain], r.line)
		case ownedBuiltinRule(table, r, marks):
			haveRules[r.chain] = append(haveRules[r.chain], r.line)
			owned = append(owned, r)
		}
	}
	// A kernel chain whose istio rules are not exactly the wanted ones, in order, has them
	// all removed and re-added, so their relative order (which TPROXY's marks rely on) is
	// istio's whatever was there before.
	rewrite := map[string]bool{}
	upToDate := len(stale) == 0
	for _, c := range chains {
		upToDate = upToDate && slices.Contains(have.chains, c) && slices.Equal(haveRules[c], want[c])
	}
	for _, c := range []string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"} {
		if !slices.Equal(haveRules[c], want[c]) {
			rewrite[c] = true
			upToDate = false
		}
	}
	if upToDate {
		return ""
	}

	var b strings.Builder
	b.WriteString("*" + table + "\n")
	for _, c := range chains {
		// With --noflush, a chain line creates the chain, or flushes it if it exists.
		b.WriteString(":" + c + " - [0:0]\n")
	}
	for _, c := range stale {
		b.WriteString("-F " + c + "\n")
	}
	for _, r := range owned {
		if rewrite[r.chain] {
			b.WriteString("-D" + strings.TrimPrefix(r.line, "-A") + "\n")
		}
	}
	for _, c := range stale {
		b.WriteString("-X " + c + "\n")
	}
	for _, r := range rs {
		if r.table == table && (!builtin(r.chain) || rewrite[r.chain]) {
			b.WriteString(r.line() + "\n")
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// cleanupInput is the iptables-restore --noflush input that removes istio's chains and
// rules from every table in have, or "" when there are none.
func cleanupInput(have map[string]*savedTable) string {
	var tables []string
	for t := range have {
		tables = append(tables, t)
	}
	slices.Sort(tables)
	var b strings.Builder
	for _, t := range tables {
		var lines []string
		marks := istioMarks(have[t])
		for _, r := range have[t].rules {
			if isBuiltinChain(r.chain) && ownedBuiltinRule(t, r, marks) {
				lines = append(lines, "-D"+strings.TrimPrefix(r.line, "-A"))
			}
		}
		var ours []string
		for _, c := range have[t].chains {
			if strings.HasPrefix(c, chainPrefix) {
				ours = append(ours, c)
			}
		}
		// Flush all before deleting any: ISTIO_ chains jump to each other.
		for _, c := range ours {
			lines = append(lines, "-F "+c)
		}
		for _, c := range ours {
			lines = append(lines, "-X "+c)
		}
		if len(lines) > 0 {
			b.WriteString("*" + t + "\n" + strings.Join(lines, "\n") + "\nCOMMIT\n")
		}
	}
	return b.String()
}
