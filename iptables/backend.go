package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/policy"
)

// Backend is an iptables implementation: the nf_tables one (iptables-nft) or the legacy
// x_tables one (iptables-legacy). Rules live in one or the other, so a netns must be
// applied and cleaned with the one that holds its rules.
type Backend string

const (
	// BackendAuto detects: the backend that already holds ISTIO_ chains in the netns if only
	// one does, else iptables-nft if it works there, else iptables-legacy.
	BackendAuto Backend = ""
	// BackendNFT is iptables-nft (nf_tables), the default of current distributions.
	BackendNFT Backend = "nft"
	// BackendLegacy is iptables-legacy (x_tables).
	BackendLegacy Backend = "legacy"
)

// ParseBackend reads a --backend value: "auto" (or ""), "nft" or "legacy".
func ParseBackend(s string) (Backend, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return BackendAuto, nil
	case "nft", "nf_tables":
		return BackendNFT, nil
	case "legacy":
		return BackendLegacy, nil
	}
	return "", fmt.Errorf("unknown iptables backend %q: use auto, nft or legacy", s)
}

// BackendOfBinary is the backend an iptables binary's name says (iptables-nft,
// iptables-legacy-restore, /usr/sbin/ip6tables-nft, ...), as istio's
// --force-iptables-binary names one; false when the name says neither.
func BackendOfBinary(path string) (Backend, bool) {
	switch bin := filepath.Base(path); {
	case strings.Contains(bin, "legacy"):
		return BackendLegacy, true
	case strings.Contains(bin, "nft"):
		return BackendNFT, true
	}
	return BackendAuto, false
}

func (b Backend) String() string {
	if b == BackendAuto {
		return "auto"
	}
	return string(b)
}

// tool is one backend's restore and save binaries for one family (iptables-* for IPv4,
// ip6tables-* for IPv6).
type tool struct {
	backend       Backend
	restore, save string
}

// sbinDirs are searched when PATH lacks them (minimal init-container environments do).
var sbinDirs = []string{"/usr/sbin", "/sbin", "/usr/local/sbin"}

func lookPath(name string) (string, bool) {
	if p, err := exec.LookPath(name); err == nil {
		return p, true
	}
	for _, d := range sbinDirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, true
		}
	}
	return "", false
}

// Available reports whether any iptables-restore is installed (PATH or the sbin dirs
// minimal containers leave out of it).
func Available() bool {
	for _, name := range []string{"iptables-restore", "iptables-nft-restore", "iptables-legacy-restore"} {
		if _, ok := lookPath(name); ok {
			return true
		}
	}
	return false
}

// binary is the command family f's rules are written with: iptables or ip6tables.
func binary(f policy.Family) string {
	if f == policy.IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// findTool locates a backend's binaries for family f: <ip6>tables-<b>-restore/-save, or the
// plain <ip6>tables-restore/-save when `--version` says they are that backend.
func findTool(b Backend, f policy.Family) (tool, bool) {
	name := binary(f)
	r, okR := lookPath(name + "-" + string(b) + "-restore")
	s, okS := lookPath(name + "-" + string(b) + "-save")
	if okR && okS {
		return tool{b, r, s}, true
	}
	r, okR = lookPath(name + "-restore")
	s, okS = lookPath(name + "-save")
	if !okR || !okS {
		return tool{}, false
	}
	out, err := exec.Command(r, "--version").CombinedOutput()
	if err != nil {
		return tool{}, false
	}
	// "iptables-restore v1.8.9 (nf_tables)"; legacy builds say "(legacy)" or nothing.
	isNFT := strings.Contains(string(out), "nf_tables")
	if isNFT == (b == BackendNFT) {
		return tool{b, r, s}, true
	}
	return tool{}, false
}

// errNoIptables is returned when no backend's binaries exist.
var errNoIptables = errors.New("iptables-restore not found: install the iptables package (it provides iptables-nft-restore and iptables-legacy-restore)")

// run runs a command inside the netns at path, feeding it stdin, and returns its stdout.
// The error is one line: the command and its first line of complaint.
func run(ctx context.Context, netnsPath, stdin, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := nsexec.Do(netnsPath, cmd.Run); err != nil {
		msg := firstLine(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return stdout.String(), fmt.Errorf("%s in netns %s: %s", filepath.Base(name), netnsPath, msg)
	}
	return stdout.String(), nil
}

// firstLine returns the first line that is not an iptables warning about the other backend.
func firstLine(s string) string {
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "# Warning:") {
			return l
		}
	}
	return ""
}

// dump runs the tool's save (all tables, no counters) in the netns and parses it.
func (t tool) dump(ctx context.Context, netnsPath string) (map[string]*savedTable, error) {
	out, err := run(ctx, netnsPath, "", t.save)
	if err != nil {
		return nil, err
	}
	return parseSave(out)
}

// hasIstio reports whether a dump holds any ISTIO_ chain.
func hasIstio(tables map[string]*savedTable) bool {
	for _, t := range tables {
		for _, c := range t.chains {
			if strings.HasPrefix(c, chainPrefix) {
				return true
			}
		}
	}
	return false
}

// candidate is a backend that works in the netns, with what it holds there now: its IPv4
// tables, and its IPv6 ones when its ip6tables works there (v6 nil and err6 saying why not:
// no ip6tables binaries, or a kernel without IPv6; only a config capturing IPv6 needs them).
type candidate struct {
	tool
	state  map[string]*savedTable
	v6     *tool
	state6 map[string]*savedTable
	err6   error
}

// holdsIstio reports whether either family's tables hold ISTIO_ chains.
func (c candidate) holdsIstio() bool { return hasIstio(c.state) || hasIstio(c.state6) }

// ipv6 returns the candidate's ip6tables, or why it cannot be used.
func (c candidate) ipv6() (tool, error) {
	if c.v6 == nil {
		return tool{}, c.err6
	}
	return *c.v6, nil
}

// candidates returns the backends usable in the netns, nft first. With a forced backend it
// returns that one or an error saying why it cannot be used.
func (o Options) candidates(ctx context.Context, netnsPath string) ([]candidate, error) {
	backends := []Backend{BackendNFT, BackendLegacy}
	if o.Backend != BackendAuto {
		if o.Backend != BackendNFT && o.Backend != BackendLegacy {
			return nil, fmt.Errorf("unknown iptables backend %q: use nft or legacy", string(o.Backend))
		}
		backends = []Backend{o.Backend}
	}
	if _, err := os.Stat(netnsPath); err != nil {
		return nil, fmt.Errorf("network namespace %s: %w; pass the pod's netns path (like /run/netns/NAME or /proc/PID/ns/net)", netnsPath, errors.Unwrap(err))
	}
	// Every backend's two dumps run at once: each is a process started in the netns, and
	// an init container's run waited for four of them in turn after attaching.
	type dumped struct {
		found bool
		c     candidate
		err   error
	}
	res := make([]dumped, len(backends))
	var wg sync.WaitGroup
	for i, b := range backends {
		t, ok := findTool(b, policy.IPv4)
		if !ok {
			continue
		}
		res[i] = dumped{found: true, c: candidate{tool: t}}
		r := &res[i]
		wg.Add(2)
		go func() {
			defer wg.Done()
			r.c.state, r.err = t.dump(ctx, netnsPath)
		}()
		go func() {
			defer wg.Done()
			if t6, ok := findTool(b, policy.IPv6); !ok {
				r.c.err6 = fmt.Errorf("ip6tables-%s-restore not found: install the iptables package (it provides ip6tables-nft-restore and ip6tables-legacy-restore)", b)
			} else if r.c.state6, r.c.err6 = t6.dump(ctx, netnsPath); r.c.err6 == nil {
				r.c.v6 = &t6
			}
		}()
	}
	wg.Wait()
	var out []candidate
	var errs []string
	found := false
	for _, r := range res {
		found = found || r.found
		switch {
		case !r.found:
		case r.err != nil:
			errs = append(errs, r.err.Error())
		default:
			out = append(out, r.c)
		}
	}
	switch {
	case !found && o.Backend != BackendAuto:
		return nil, fmt.Errorf("iptables-%s-restore not found: install the iptables package, or use another backend", o.Backend)
	case !found:
		return nil, errNoIptables
	case len(out) == 0:
		return nil, fmt.Errorf("no iptables backend works in netns %s (%s); check that the kernel has nf_tables or ip_tables", netnsPath, strings.Join(errs, "; "))
	}
	return out, nil
}

// pick chooses the backend Apply uses: the one that already holds ISTIO_ chains when only
// one does (so re-applying after istio-init or an earlier run stays in one backend and
// leaves no rules behind in the other), else the first that works (nft before legacy).
func (o Options) pick(ctx context.Context, netnsPath string) (candidate, error) {
	cs, err := o.candidates(ctx, netnsPath)
	if err != nil {
		return candidate{}, err
	}
	var holding []candidate
	for _, c := range cs {
		if c.holdsIstio() {
			holding = append(holding, c)
		}
	}
	if len(holding) == 1 {
		return holding[0], nil
	}
	return cs[0], nil
}
