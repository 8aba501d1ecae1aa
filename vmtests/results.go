package vmtests

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// PackageResult is one test binary's outcome in one guest.
type PackageResult struct {
	Package string
	Outcome string // Pass, Fail or Timeout
	Seconds float64
	Reason  string // for failures: failing tests, or why there is no result
	// Failures is what the failing tests printed (failureExcerpt): a CI log keeps only
	// the run's tail, where the host prints this, and the guest's console is gone with
	// the CI machine.
	Failures string
}

// GuestResult is what one boot produced.
type GuestResult struct {
	Release  string // uname -r reported by the guest; empty if it never got that far
	Packages []PackageResult
	Booted   bool     // the init reported anything (its first line, the release): see DiedBooting
	Done     bool     // the init reported it finished
	Problems []string // things that fail the run besides packages: no DONE line, a panic, ...
	Notes    []string // worth reading, not failures by themselves: modules that did not load
}

// OK reports whether every package passed and the guest finished.
func (g GuestResult) OK() bool {
	if !g.Done || len(g.Problems) > 0 {
		return false
	}
	for _, p := range g.Packages {
		if p.Outcome != Pass {
			return false
		}
	}
	return true
}

// DiedBooting reports whether the guest's kernel died (or hung) before the init's first
// line: no test had run, so the boot says nothing about the code under test, and the host
// may boot it again. Under TCG with a thread per vCPU, Debian's 6.12 with 32 vCPUs died so,
// on an int3 its own live patching had already removed (docs/kernel-facts.md). A guest
// that dies later, with a test running, is that test's failure and is never booted again.
func (g GuestResult) DiedBooting() bool { return !g.Booted }

// ParseGuest turns the results port's lines and the console log into a GuestResult. Only
// lines carrying token count. Every package in pkgs gets a result: one the guest did not
// report is a TIMEOUT if the host had to kill the VM, else a FAIL. Nothing here defaults to
// a pass.
func ParseGuest(token string, pkgs []Package, results, console string, hostTimedOut bool) GuestResult {
	var g GuestResult
	got := map[string]PackageResult{}
	for _, line := range strings.Split(results, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[1] != token {
			continue
		}
		g.Booted = true
		switch {
		case f[0] == KeyKernel && len(f) == 3:
			g.Release = f[2]
		case f[0] == KeyModule && len(f) >= 3:
			g.Notes = append(g.Notes, "module "+strings.Join(f[2:], " ")+" did not load")
		case f[0] == KeyResult && len(f) == 5:
			secs, err := strconv.ParseFloat(f[4], 64)
			if err != nil || (f[3] != Pass && f[3] != Fail && f[3] != Timeout) {
				continue
			}
			got[f[2]] = PackageResult{Package: f[2], Outcome: f[3], Seconds: secs}
		case f[0] == KeyDone && len(f) == 2:
			g.Done = true
		}
	}

	sections := consoleSections(console)
	for _, p := range pkgs {
		r, ok := got[p.Path]
		switch {
		case ok && r.Outcome != Pass:
			r.Reason = failReason(sections[p.Path])
			r.Failures = failureExcerpt(sections[p.Path])
		case !ok && hostTimedOut:
			r = PackageResult{Package: p.Path, Outcome: Timeout, Reason: "no result: the host killed the VM (no progress, or its hard timeout)"}
		case !ok:
			r = PackageResult{Package: p.Path, Outcome: Fail, Reason: "no result line (guest crashed or stopped early; see the console log)"}
		}
		g.Packages = append(g.Packages, r)
	}

	if !g.Done {
		g.Problems = append(g.Problems, "the guest did not report finishing")
	}
	if hostTimedOut {
		g.Problems = append(g.Problems, "the host killed the VM: no result line for too long, or the run's hard timeout")
	}
	// The kernel's own complaints: a panic, BUG or oops fails the run even if every package
	// passed (the tests may not have noticed); a WARNING is worth a note.
	for _, l := range strings.Split(strings.ReplaceAll(console, "\r", ""), "\n") {
		for _, k := range []string{"Kernel panic - not syncing", "BUG:", "Oops:", "WARNING:"} {
			if i := strings.Index(l, k); i >= 0 && strings.HasPrefix(l, "[") {
				if k == "WARNING:" {
					g.Notes = append(g.Notes, "kernel: "+strings.TrimSpace(l[i:]))
				} else {
					g.Problems = append(g.Problems, "kernel: "+strings.TrimSpace(l[i:]))
				}
			}
		}
	}
	seen := map[string]int{}
	var order []string
	for _, l := range strings.Split(console, "\n") {
		if _, after, ok := strings.Cut(l, "vmtest: modprobe "); ok {
			req := "modprobe " + strings.TrimSpace(after)
			if seen[req] == 0 {
				order = append(order, req)
			}
			seen[req]++
		}
	}
	for _, req := range order {
		g.Notes = append(g.Notes, fmt.Sprintf("%s (%d times)", req, seen[req]))
	}
	return g
}

// consoleSections splits the console log at the init's "=== VMTEST <package>:" lines.
func consoleSections(console string) map[string]string {
	m := map[string]string{}
	cur := ""
	var b strings.Builder
	flush := func() {
		if cur != "" {
			m[cur] = b.String()
		}
		b.Reset()
	}
	for _, l := range strings.Split(strings.ReplaceAll(console, "\r", ""), "\n") {
		if rest, ok := strings.CutPrefix(l, "=== VMTEST "); ok {
			flush()
			cur, _, _ = strings.Cut(rest, ":")
			continue
		}
		b.WriteString(l)
		b.WriteByte('\n')
	}
	flush()
	return m
}

// failReason names the failed top-level tests of a package's console output, or the panic.
func failReason(out string) string {
	var failed []string
	for _, l := range strings.Split(out, "\n") {
		if name, ok := strings.CutPrefix(l, "--- FAIL: "); ok {
			name, _, _ = strings.Cut(name, " ")
			failed = append(failed, name)
		}
		if strings.HasPrefix(l, "panic: test timed out") {
			return strings.TrimSpace(l)
		}
	}
	if len(failed) > 0 {
		return "failed: " + strings.Join(failed, ", ")
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "panic: ") || strings.HasPrefix(l, "fatal error: ") {
			return strings.TrimSpace(l)
		}
	}
	return "no failing test named in the output; see the console log"
}

// Limits of failureExcerpt: the deepest failing tests, the last lines of each.
const (
	excerptTests = 3
	excerptLines = 40
)

// failureExcerpt is what the first few failing leaf tests of a package's `-test.v` output
// printed (their messages come last): each test's own lines, which -v marks off with
// "=== RUN", "=== NAME" or "=== CONT" lines naming it, and its "--- FAIL" line.
func failureExcerpt(out string) string {
	lines := strings.Split(out, "\n")
	var failed []string
	for _, l := range lines {
		if rest, ok := strings.CutPrefix(strings.TrimLeft(l, " "), "--- FAIL: "); ok {
			name, _, _ := strings.Cut(rest, " ")
			failed = append(failed, name)
		}
	}
	var b strings.Builder
	shown := 0
	for _, name := range failed {
		if shown == excerptTests {
			break
		}
		if slices.ContainsFunc(failed, func(f string) bool { return strings.HasPrefix(f, name+"/") }) {
			continue // a parent: its failing subtests say why
		}
		var own []string
		mine := false
		for _, l := range lines {
			if rest, ok := strings.CutPrefix(l, "=== "); ok {
				verb, test, _ := strings.Cut(rest, " ")
				mine = (verb == "RUN" || verb == "NAME" || verb == "CONT") && strings.TrimSpace(test) == name
				continue
			}
			if strings.HasPrefix(strings.TrimLeft(l, " "), "--- ") {
				mine = false // the summary of finished tests
			}
			if mine {
				own = append(own, l)
			}
		}
		if len(own) > excerptLines {
			own = append([]string{fmt.Sprintf("    ... %d lines before", len(own)-excerptLines)}, own[len(own)-excerptLines:]...)
		}
		fmt.Fprintf(&b, "--- FAIL: %s\n", name)
		for _, l := range own {
			b.WriteString(l + "\n")
		}
		shown++
	}
	return b.String()
}

// Table formats results as a fixed-width text table, one row per kernel and package.
func Table(rows [][]string) string {
	widths := make([]int, len(rows[0]))
	for _, r := range rows {
		for i, c := range r {
			if i < len(r)-1 && len(c) > widths[i] {
				widths[i] = len(c)
			}
		}
	}
	var b strings.Builder
	for _, r := range rows {
		for i, c := range r {
			if i < len(r)-1 {
				fmt.Fprintf(&b, "%-*s  ", widths[i], c)
			} else {
				b.WriteString(c)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}
