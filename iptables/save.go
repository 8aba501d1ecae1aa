package iptables

import (
	"bufio"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/meshdivert/divert/policy"
)

// saveForm predicts how iptables-save (1.8, nft and legacy alike) prints r: addresses and
// interfaces first, implicit protocol matches spelled out, marks in hex, targets with their
// defaults. Apply uses it to see which of its rules in the kernel's chains (PREROUTING,
// OUTPUT) are already there; the privileged tests check it against the real iptables-save
// for every golden case. A wrong prediction costs an unneeded re-append, never a duplicate.
func (r rule) saveForm() string {
	var head, matches, target []string
	spec := r.spec
	neg := false
	for i := 0; i < len(spec); i++ {
		a := spec[i]
		switch {
		case a == "!":
			neg = true
			continue
		case a == "-s" || a == "-d" || a == "-i" || a == "-o" || a == "-p":
			i++ // kept apart and ordered below
		case a == "-m":
			matches = append(matches, "-m", spec[i+1])
			i++
		case a == "-j":
			target = saveTarget(spec[i+1:], r.family)
			i = len(spec)
		case a == "--dport" || a == "--sport":
			// iptables loads the protocol's match implicitly; save spells it out.
			if !strings.Contains(" "+strings.Join(matches, " ")+" ", " -m "+proto(spec)+" ") {
				matches = append(matches, "-m", proto(spec))
			}
			matches = appendNeg(matches, neg, a, spec[i+1])
			i++
		case a == "--mark":
			matches = appendNeg(matches, neg, a, hexMark(spec[i+1]))
			i++
		default:
			if strings.HasPrefix(a, "--") && i+1 < len(spec) && !strings.HasPrefix(spec[i+1], "-") {
				matches = appendNeg(matches, neg, a, spec[i+1])
				i++
			} else {
				matches = appendNeg(matches, neg, a)
			}
		}
		neg = false
	}
	for _, opt := range []string{"-s", "-d", "-i", "-o", "-p"} {
		for i := 0; i < len(spec)-1; i++ {
			if spec[i] == opt {
				head = appendNeg(head, i > 0 && spec[i-1] == "!", opt, spec[i+1])
			}
		}
	}
	parts := append([]string{"-A", r.chain}, head...)
	parts = append(parts, matches...)
	parts = append(parts, target...)
	return strings.Join(parts, " ")
}

func appendNeg(out []string, neg bool, args ...string) []string {
	if neg {
		out = append(out, "!")
	}
	return append(out, args...)
}

func proto(spec []string) string {
	for i := 0; i < len(spec)-1; i++ {
		if spec[i] == "-p" {
			return spec[i+1]
		}
	}
	return "tcp"
}

// hexMark prints a decimal mark the way the mark and connmark matches save it.
func hexMark(dec string) string {
	n, err := strconv.ParseUint(dec, 10, 32)
	if err != nil {
		return dec
	}
	return fmt.Sprintf("0x%x", n)
}

// saveTarget spells a target with the defaults <ip6>tables-save adds for family f.
func saveTarget(t []string, f policy.Family) []string {
	out := []string{"-j", t[0]}
	opts := t[1:]
	switch t[0] {
	case "REDIRECT":
		// istio writes --to-port for UDP DNS; iptables takes it as --to-ports.
		if len(opts) == 2 && opts[0] == "--to-port" {
			return append(out, "--to-ports", opts[1])
		}
	case "MARK":
		// --set-mark X is --set-xmark X/0xffffffff.
		if len(opts) == 2 && opts[0] == "--set-mark" {
			return append(out, "--set-xmark", hexMark(opts[1])+"/0xffffffff")
		}
	case "CONNMARK":
		if len(opts) == 1 && (opts[0] == "--save-mark" || opts[0] == "--restore-mark") {
			return append(out, opts[0], "--nfmask", "0xffffffff", "--ctmask", "0xffffffff")
		}
	case "TPROXY":
		var port, mark string
		for i := 0; i+1 < len(opts); i += 2 {
			switch opts[i] {
			case "--on-port":
				port = opts[i+1]
			case "--tproxy-mark":
				v, mask, _ := strings.Cut(opts[i+1], "/")
				mark = hexMark(v) + "/" + mask
			}
		}
		onIP := "0.0.0.0"
		if f == policy.IPv6 {
			onIP = "::"
		}
		return append(out, "--on-port", port, "--on-ip", onIP, "--tproxy-mark", mark)
	}
	return append(out, opts...)
}

// savedTable is one table of iptables-save output.
type savedTable struct {
	chains []string    // user-defined chains, in save order
	rules  []savedRule // every rule, in save order
}

type savedRule struct {
	chain string
	line  string // "-A CHAIN ..." as printed
}

// parseSave reads iptables-save output (comments, counters and all) into tables.
func parseSave(out string) (map[string]*savedTable, error) {
	tables := map[string]*savedTable{}
	var cur *savedTable
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || line == "COMMIT":
		case strings.HasPrefix(line, "*"):
			cur = &savedTable{}
			tables[strings.TrimSpace(line[1:])] = cur
		case cur == nil:
			return nil, fmt.Errorf("unexpected iptables-save line outside a table: %q", line)
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			if !isBuiltinChain(name) {
				cur.chains = append(cur.chains, name)
			}
		case strings.HasPrefix(line, "-A "):
			// Some save variants prefix counters ("[0:0] -A ..."); -c is never passed here.
			f := strings.Fields(line)
			cur.rules = append(cur.rules, savedRule{chain: f[1], line: line})
		}
	}
	return tables, sc.Err()
}

// isBuiltinChain reports whether name is one of the kernel's chains (which have a policy
// and cannot be deleted).
func isBuiltinChain(name string) bool {
	switch name {
	case "PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING":
		return true
	}
	return false
}

// istioMarkRules match, in iptables-save spelling, the rules istio-iptables puts into the
// kernel's mangle chains in TPROXY mode; the first group is the mark, which must be one
// istio's own chains use (see istioMarks) so that look-alike rules of other software with
// other marks are left alone. With the jumps into ISTIO_ chains they are what Cleanup (and
// Apply, when settings change) removes from chains shared with other software.
var istioMarkRules = []*regexp.Regexp{
	regexp.MustCompile(`^-A PREROUTING -p tcp -m mark --mark (0x[0-9a-f]+) -j CONNMARK --save-mark( --nfmask 0xffffffff --ctmask 0xffffffff)?$`),
	regexp.MustCompile(`^-A OUTPUT -o lo -p tcp -m mark --mark (0x[0-9a-f]+) -j RETURN$`),
	regexp.MustCompile(`^-A OUTPUT -p tcp -m connmark --mark (0x[0-9a-f]+) -j CONNMARK --restore-mark( --nfmask 0xffffffff --ctmask 0xffffffff)?$`),
}

// istioOwnerMarkRule is the proxy's own-connection mark rule (IPv4's or IPv6's); its mark
// (1338) and shape are istio's alone.
var istioOwnerMarkRule = regexp.MustCompile(`^-A OUTPUT ! -d (127\.0\.0\.1/32|::1/128) -o lo -p tcp -m owner --[ug]id-owner [0-9]+ -j MARK --set-xmark 0x53a/0xffffffff$`)

var markValue = regexp.MustCompile(`--(?:mark|set-xmark|tproxy-mark) (0x[0-9a-f]+)`)

// istioInterfaceRule is -c's and -k's RETURN in the kernel's chains (nat, and mangle in
// TPROXY mode). Its shape is common, so it counts as istio's only in a table that holds
// istio's chains (istioChains in the marks).
var istioInterfaceRule = regexp.MustCompile(`^-A (PREROUTING -i|OUTPUT -o) [^ ]+ -j RETURN$`)

// istioChains is the key istioMarks sets when the table has ISTIO_ chains; never a mark.
const istioChains = "istio"

// istioMarks collects the marks istio's chains in t use (TPROXY's -t mark, and 1338), and
// istioChains if there are ISTIO_ chains at all.
func istioMarks(t *savedTable) map[string]bool {
	marks := map[string]bool{}
	if t == nil {
		return marks
	}
	for _, c := range t.chains {
		if strings.HasPrefix(c, chainPrefix) {
			marks[istioChains] = true
		}
	}
	for _, r := range t.rules {
		if strings.HasPrefix(r.chain, chainPrefix) {
			for _, m := range markValue.FindAllStringSubmatch(r.line, -1) {
				marks[m[1]] = true
			}
		}
	}
	return marks
}

// ownedBuiltinRule reports whether a rule in one of the kernel's chains is istio's: a jump
// into an ISTIO_ chain, an interface's RETURN beside istio's chains, or (mangle) one of the
// TPROXY mark rules for one of marks.
func ownedBuiltinRule(table string, r savedRule, marks map[string]bool) bool {
	f := strings.Fields(r.line)
	for i, a := range f {
		if (a == "-j" || a == "-g") && i+1 < len(f) && strings.HasPrefix(f[i+1], chainPrefix) {
			return true
		}
	}
	if (table == tableNat || table == tableMangle) && marks[istioChains] && istioInterfaceRule.MatchString(r.line) {
		return true
	}
	if table != tableMangle {
		return false
	}
	if istioOwnerMarkRule.MatchString(r.line) {
		return true
	}
	for _, re := range istioMarkRules {
		if m := re.FindStringSubmatch(r.line); m != nil && marks[m[1]] {
			return true
		}
	}
	return false
}

// contents is what each chain of table holds once rs is applied to empty chains: the
// saveForm of its rules, with istio's inserts at their positions.
func (rs ruleSet) contents(table string) map[string][]string {
	out := map[string][]string{}
	for _, r := range rs {
		if r.table != table {
			continue
		}
		c := out[r.chain]
		if r.pos > 0 && r.pos <= len(c) {
			c = append(c[:r.pos-1], append([]string{r.saveForm()}, c[r.pos-1:]...)...)
		} else {
			c = append(c, r.saveForm())
		}
		out[r.chain] = c
	}
	return out
}
