// Command vmtest runs divert's kernel-touching test binaries inside qemu guests booting
// Debian's packaged kernels (vmtests/kernels.txt) and prints a table per kernel and package.
// It exits non-zero unless every package passed on every kernel. See vmtests/README.md.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/meshdivert/divert/internal/debapt"
	"github.com/meshdivert/divert/vmtests"
)

// Packages are the kernel-touching test packages run in every guest. Add new ones here.
var Packages = []string{
	"./bpf",
	"./loader",
	"./cmd/divert",
	"./iptables",
	"./test/testpod",
	"./test/e2e",
	"./test/security",
	"./test/parity",
}

// Slow are top-level tests that -quick (CI) skips: under TCG each takes minutes. They
// stress at scale what faster tests check once; make vmtest still runs them.
var Slow = []string{
	"TestManyConnectionsNoDrops", // test/e2e: 10,000 connections (~9 min under TCG)
	"TestApplyCases",             // iptables: every rendering case in both backends (~4 min)
	"TestRandomParity",           // test/parity: randomised configs, property test
	"TestRandomParityIPv6",       // test/parity: the same over both families
	"TestOutboundParityIPv6",     // test/parity: every outbound row on three pod shapes (~6.5 min)
	"TestEdgeParityIPv6",         // test/parity: the IPv6 edge rows on two pod shapes (218 s on 5.10)
	"TestRandomDNSParity",        // test/parity: randomised DNS configs (~1-2.5 min)
	"TestCLIKilled",              // cmd/divert: 160 kills of the CLI (over 5 min under TCG)
	"TestCrashAtEveryStep",       // loader: a kill after each of 51 steps (~4 min)
}

// selftestFail always fails; VMTEST_SELFTEST_FAIL=1 adds it to a normal run.
const selftestFail = "./vmtests/testdata/selftest/fail"

// bootStall gives up on a guest whose init has said nothing that long after qemu started.
// The init speaks right after the kernel has booted and unpacked the initramfs, well under
// a minute in the 32-CPU TCG guests; a guest wedged there (kernel-facts.md, "Guests under
// TCG") is booted once more, minutes later instead of after a whole package's -timeout.
const bootStall = 5 * time.Minute

// Selftest packages and the outcome the runner must report for each: a pass, a failure, a
// hang and a guest crash (which leaves every later package without a result line).
var selftest = []struct{ pkg, want string }{
	{"./vmtests/testdata/selftest/pass", vmtests.Pass},
	{selftestFail, vmtests.Fail},
	{"./vmtests/testdata/selftest/hang", vmtests.Timeout},
	{"./vmtests/testdata/selftest/crash", vmtests.Fail},
	{"./vmtests/testdata/selftest/after", vmtests.Fail}, // passes, but runs after the crash: no result line
}

func main() {
	var (
		kernelsFlag = flag.String("kernels", envOr("KERNELS", ""), "comma-separated kernel names from kernels.txt (default: all); env KERNELS")
		pkgsFlag    = flag.String("packages", envOr("VMTEST_PACKAGES", ""), "comma-separated test packages (default: the built-in list); env VMTEST_PACKAGES")
		run         = flag.String("run", envOr("VMTEST_RUN", ""), "passed as -test.run to every test binary; env VMTEST_RUN")
		skip        = flag.String("skip", envOr("VMTEST_SKIP", ""), "passed as -test.skip to every test binary; env VMTEST_SKIP")
		quick       = flag.Bool("quick", os.Getenv("VMTEST_QUICK") != "", "skip the slow tests listed in Slow (what CI runs); env VMTEST_QUICK=1")
		memlock     = flag.Bool("memlock-unlimited", os.Getenv("VMTEST_MEMLOCK_UNLIMITED") != "", "run the tests with RLIMIT_MEMLOCK=infinity instead of the kernel's default; env VMTEST_MEMLOCK_UNLIMITED=1")
		timeout     = flag.Duration("timeout", 20*time.Minute, "per test binary inside the guest (-test.timeout; killed 30s later); generous because TCG on a busy host is slow")
		runner      = flag.String("runner", envOr("RUNNER", "qemu"), "qemu or vng (virtme-ng); env RUNNER")
		accel       = flag.String("accel", envOr("ACCEL", "tcg"), "qemu accelerator, as qemu's -accel takes it: tcg, tcg,thread=single (one host thread runs every vCPU in turn), or kvm on hosts with working hardware virtualisation; env ACCEL")
		appendArgs  = flag.String("append", envOr("VMTEST_APPEND", ""), "extra guest kernel command line; env VMTEST_APPEND")
		mem         = flag.Int("mem", 2048, "guest memory in MiB")
		cpus        = flag.Int("smp", 2, "guest CPUs")
		verbose     = flag.Bool("v", os.Getenv("VMTEST_VERBOSE") != "", "stream the guest console; env VMTEST_VERBOSE=1")
		outDir      = flag.String("out", "", "logs and build outputs (default: <repo>/vmtests/out)")
		cacheDir    = flag.String("cache", "", "kernel and apt cache (default: $VMTEST_CACHE, else $XDG_CACHE_HOME or ~/.cache, /divert-vmtests)")
		list        = flag.Bool("list", false, "print the kernel packages the mirror offers now, as kernels.txt lines, and exit")
		self        = flag.Bool("selftest", false, "prove the runner reports a failing, hanging and crashing guest test (one kernel)")
	)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *quick {
		// -quick keeps the 20-minute limit per binary: test/parity, its rows on three
		// backends, took 12 minutes in the 6.1 guest under TCG at load 10 (2026-12-06), and
		// a limit that slow hosts reach only makes CI flaky; a hang costs 8 minutes more.
		// -test.skip matches per name level, so anchoring keeps subtests of others alone.
		q := "^(" + strings.Join(Slow, "|") + ")$"
		if *skip != "" {
			q = *skip + "|" + q
		}
		*skip = q
	}
	r := &vmRun{memlock: *memlock, appendArgs: *appendArgs, run: *run, skip: *skip, timeout: *timeout, runner: *runner, accel: *accel, mem: *mem, cpus: *cpus, verbose: *verbose}
	err := r.setup(*outDir, *cacheDir)
	if err == nil && *list {
		err = r.list()
	} else if err == nil {
		var ok bool
		ok, err = r.main(ctx, splitList(*kernelsFlag), splitList(*pkgsFlag), *self)
		if err == nil && !ok {
			os.Exit(1)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "vmtest: %v\n", err)
		os.Exit(2)
	}
}

type vmRun struct {
	run, skip     string
	appendArgs    string
	memlock       bool
	timeout       time.Duration
	runner, accel string
	mem, cpus     int
	verbose       bool
	repo, out     string
	cache         string
	kernels       []vmtests.Kernel
	apt           *debapt.Apt
}

func (r *vmRun) setup(outDir, cacheDir string) error {
	gomod, err := exec.Command(goCmd(), "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(gomod)) == "" || strings.TrimSpace(string(gomod)) == os.DevNull {
		return fmt.Errorf("run from inside the divert module (go env GOMOD: %v)", err)
	}
	r.repo = filepath.Dir(strings.TrimSpace(string(gomod)))
	r.out = first(outDir, filepath.Join(r.repo, "vmtests", "out"))
	r.cache = first(cacheDir, os.Getenv("VMTEST_CACHE"))
	if r.cache == "" {
		base := os.Getenv("XDG_CACHE_HOME")
		if base == "" {
			home, err := os.UserHomeDir()
			if err != nil {
				return err
			}
			base = filepath.Join(home, ".cache")
		}
		r.cache = filepath.Join(base, "divert-vmtests")
	}
	if r.kernels, err = vmtests.ReadKernels(filepath.Join(r.repo, "vmtests", "kernels.txt")); err != nil {
		return err
	}
	if r.apt, err = vmtests.NewApt(filepath.Join(r.cache, "apt"), os.Stderr); err != nil {
		return err
	}
	var suites []string
	for _, k := range r.kernels {
		suites = append(suites, k.Suite)
	}
	stale, err := r.apt.Setup(suites)
	if err == nil && stale {
		err = r.apt.Update() // first use, new suites or mirror: the old lists would not match
	}
	return err
}

func (r *vmRun) list() error { return vmtests.ListCandidates(r.apt, os.Stdout) }

// main runs the matrix and reports whether everything passed.
func (r *vmRun) main(ctx context.Context, kernelNames, pkgPaths []string, self bool) (bool, error) {
	kernels := r.kernels
	if len(kernelNames) > 0 {
		kernels = nil
		for _, n := range kernelNames {
			i := slices.IndexFunc(r.kernels, func(k vmtests.Kernel) bool { return k.Name == n })
			if i < 0 {
				return false, fmt.Errorf("kernel %q is not in vmtests/kernels.txt", n)
			}
			kernels = append(kernels, r.kernels[i])
		}
	}
	if len(pkgPaths) == 0 {
		pkgPaths = Packages
	}
	if os.Getenv("VMTEST_SELFTEST_FAIL") == "1" {
		pkgPaths = append(slices.Clone(pkgPaths), selftestFail)
	}
	if self {
		kernels = kernels[:1]
		pkgPaths = nil
		for _, s := range selftest {
			pkgPaths = append(pkgPaths, s.pkg)
		}
		r.timeout = 20 * time.Second
	}
	if r.runner != "qemu" && r.runner != "vng" {
		return false, fmt.Errorf("unknown runner %q: use qemu or vng", r.runner)
	}
	if err := os.MkdirAll(r.out, 0o755); err != nil {
		return false, err
	}

	t0 := time.Now()
	pkgs, bins, initBin, err := r.build(pkgPaths)
	if err != nil {
		return false, err
	}
	if len(pkgs) == 0 {
		return false, errors.New("no test packages to run") // never a vacuous pass
	}
	fmt.Printf("vmtest: built %d test binaries in %.0fs\n", len(pkgs), time.Since(t0).Seconds())

	var base *vmtests.Initramfs
	if r.runner == "qemu" {
		if base, err = vmtests.Base(initBin, pkgs, bins, r.repo); err != nil {
			return false, fmt.Errorf("initramfs: %w", err)
		}
	}

	rows := [][]string{{"KERNEL", "RELEASE", "PACKAGE", "RESULT", "SECONDS", "NOTES"}}
	allOK := true
	var results []vmtests.GuestResult
	for _, k := range kernels {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		g, wall, cpu, logPath, err := r.kernel(ctx, k, pkgs, bins, initBin, base)
		if err == nil && g.DiedBooting() && ctx.Err() == nil {
			// No test ran: boot once more, keeping the first boot's logs and saying so.
			kept, kerr := keepFirstBoot(logPath)
			if kerr != nil {
				return false, kerr
			}
			fmt.Printf("vmtest: kernel %s: the guest died before its init ran (no test had started); booting it once more; the first boot's console log: %s\n", k.Name, kept)
			for _, p := range g.Problems {
				fmt.Printf("vmtest:   first boot: %s\n", p)
			}
			var wall2, cpu2 time.Duration
			g, wall2, cpu2, logPath, err = r.kernel(ctx, k, pkgs, bins, initBin, base)
			wall, cpu = wall+wall2, cpu+cpu2
			g.Notes = append(g.Notes, "the first boot died before the init ran; this is the second: "+kept)
		}
		if err != nil {
			return false, fmt.Errorf("kernel %s: %w", k.Name, err)
		}
		results = append(results, g)
		for _, p := range g.Packages {
			rows = append(rows, []string{k.Name, first(g.Release, "?"), p.Package, p.Outcome, fmt.Sprintf("%.1f", p.Seconds), p.Reason})
		}
		status := "PASS"
		if !g.OK() {
			status, allOK = "FAIL", false
		}
		fmt.Printf("vmtest: kernel %s (%s): %s in %.0fs (qemu used %.0fs of CPU); console log: %s\n",
			k.Name, first(g.Release, "did not boot"), status, wall.Seconds(), cpu.Seconds(), logPath)
		for _, p := range g.Problems {
			fmt.Printf("vmtest:   problem: %s\n", p)
		}
		for _, n := range g.Notes {
			fmt.Printf("vmtest:   note: %s\n", n)
		}
	}
	table := vmtests.Table(rows)
	fmt.Print("\n" + table)
	_ = os.WriteFile(filepath.Join(r.out, "summary.txt"), []byte(table), 0o644)
	// After the table, so that a log cut to its tail still says why.
	for i, g := range results {
		for _, p := range g.Packages {
			if p.Failures != "" {
				fmt.Printf("\nvmtest: %s %s failed:\n%s", kernels[i].Name, p.Package, p.Failures)
			}
		}
	}

	if self {
		return r.checkSelftest(results[0]), nil
	}
	if allOK {
		fmt.Println("vmtest: all passed")
	} else {
		fmt.Println("vmtest: FAILED")
	}
	return allOK, nil
}

// checkSelftest compares a selftest run with the outcomes it must have produced.
func (r *vmRun) checkSelftest(g vmtests.GuestResult) bool {
	ok := !g.OK() && len(g.Packages) == len(selftest)
	for i, p := range g.Packages {
		if i < len(selftest) && p.Outcome != selftest[i].want {
			fmt.Printf("vmtest selftest: %s reported %s, want %s\n", p.Package, p.Outcome, selftest[i].want)
			ok = false
		}
	}
	if ok {
		fmt.Println("vmtest selftest: OK: a passing, failing, hanging and crashing guest test were each reported as such, and the run failed")
	} else {
		fmt.Println("vmtest selftest: FAILED: the runner does not report guest failures reliably")
	}
	return ok
}

// build compiles the guest init and one static test binary per package.
func (r *vmRun) build(paths []string) (pkgs []vmtests.Package, bins map[string]string, initBin string, err error) {
	dir := filepath.Join(r.out, "build")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, "", err
	}
	// Static: the guest has no Go toolchain and only the libraries we copy.
	env := append(os.Environ(), "CGO_ENABLED=0")
	gobuild := func(args ...string) error {
		cmd := exec.Command(goCmd(), args...)
		cmd.Dir, cmd.Env, cmd.Stdout, cmd.Stderr = r.repo, env, os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
		}
		return nil
	}
	initBin = filepath.Join(dir, "init")
	if err := gobuild("build", "-o", initBin, "./vmtests/init"); err != nil {
		return nil, nil, "", err
	}
	bins = map[string]string{}
	for _, p := range paths {
		rel := strings.TrimPrefix(filepath.Clean(p), "./")
		if tests, _ := filepath.Glob(filepath.Join(r.repo, rel, "*_test.go")); len(tests) == 0 {
			fmt.Printf("vmtest: %s has no tests here; skipped\n", p)
			continue
		}
		pkg := vmtests.Package{Path: "./" + rel, Name: strings.ReplaceAll(rel, "/", "_"), Dir: rel}
		pkgs = append(pkgs, pkg)
		bins[pkg.Path] = filepath.Join(dir, pkg.Name+".test")
		// -s -w: no symbol table or DWARF (stack traces still work), about a third smaller.
		if err := gobuild("test", "-c", "-ldflags=-s -w", "-o", bins[pkg.Path], pkg.Path); err != nil {
			return nil, nil, "", err
		}
	}
	return pkgs, bins, initBin, nil
}

// kernel fetches one kernel, boots it with the suites and parses what it reported.
func (r *vmRun) kernel(ctx context.Context, k vmtests.Kernel, pkgs []vmtests.Package, bins map[string]string, initBin string, base *vmtests.Initramfs) (g vmtests.GuestResult, wall, cpu time.Duration, logPath string, err error) {
	x, err := vmtests.Fetch(r.apt, k, r.cache)
	if err != nil {
		return g, 0, 0, "", err
	}
	dir := filepath.Join(r.out, k.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return g, 0, 0, "", err
	}
	console, results := filepath.Join(dir, "console.log"), filepath.Join(dir, "results.log")
	plan := vmtests.Plan{Token: token(), Packages: pkgs, Run: r.run, Skip: r.skip, TimeoutSec: int(r.timeout.Seconds()), GraceSec: 30, MemlockUnlimited: r.memlock}
	// The host's limit only catches a wedged guest: each binary has its own timeout inside.
	hostTimeout := 3*time.Minute + time.Duration(len(pkgs))*(r.timeout+time.Duration(plan.GraceSec+10)*time.Second)
	// A guest that reports nothing for longer than one binary may take (plus a boot) is wedged.
	stall := 3*time.Minute + r.timeout + time.Duration(plan.GraceSec)*time.Second
	var stream io.Writer // nil unless -v
	if r.verbose {
		stream = os.Stdout
	}

	start := time.Now()
	var timedOut bool
	switch r.runner {
	case "qemu":
		mods, skipped, err := vmtests.ResolveModules(x.Root, x.Release, vmtests.Modules)
		if err != nil {
			return g, 0, 0, "", err
		}
		if len(skipped) > 0 {
			fmt.Printf("vmtest: kernel %s: built in or absent, not loaded: %s\n", k.Name, strings.Join(skipped, " "))
		}
		initrd := filepath.Join(dir, "initramfs.cpio")
		if err := writeInitramfs(initrd, base, mods, plan); err != nil {
			return g, 0, 0, "", err
		}
		defer os.Remove(initrd) // ~100 MB, rebuilt every run
		fmt.Printf("vmtest: kernel %s: booting %s under %s\n", k.Name, filepath.Base(x.Image), r.accel)
		q := vmtests.Qemu{Kernel: x.Image, Initrd: initrd, Accel: r.accel, MemMB: r.mem, CPUs: r.cpus,
			Guest: vmtests.Guest{Console: console, Results: results, Timeout: hostTimeout, Stream: stream, Stall: stall, BootStall: bootStall},
			// Kernel warnings and worse reach the console, where ParseGuest looks for them.
			Append: strings.TrimSpace("loglevel=5 " + r.appendArgs)}
		timedOut, cpu, err = q.Run(ctx)
		if err != nil {
			return g, 0, 0, "", err
		}
	case "vng":
		timedOut, cpu, err = runVng(ctx, r, x, pkgs, bins, initBin, plan, console, results, hostTimeout, stall, stream)
		if err != nil {
			return g, 0, 0, "", err
		}
	}
	wall = time.Since(start)
	res, _ := os.ReadFile(results)
	con, _ := os.ReadFile(console)
	g = vmtests.ParseGuest(plan.Token, pkgs, string(res), string(con), timedOut)
	return g, wall, cpu, console, nil
}

// keepFirstBoot moves a boot's console and results logs aside as *.boot1.log, so that the
// next boot of the same kernel writes fresh ones; it returns the console log's new path.
func keepFirstBoot(console string) (string, error) {
	dir := filepath.Dir(console)
	for _, name := range []string{"console", "results"} {
		if err := os.Rename(filepath.Join(dir, name+".log"), filepath.Join(dir, name+".boot1.log")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
	}
	return filepath.Join(dir, "console.boot1.log"), nil
}

func writeInitramfs(path string, base *vmtests.Initramfs, mods []vmtests.Module, plan vmtests.Plan) error {
	part, err := vmtests.KernelPart(mods, plan)
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = base.WriteTo(f)
	if err == nil {
		_, err = part.WriteTo(f)
	}
	return errors.Join(err, f.Close())
}

func token() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func goCmd() string { return envOr("GO", "go") }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func first(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

func splitList(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' })
}
