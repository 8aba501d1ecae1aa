// Package vmtests runs divert's kernel-touching test binaries inside qemu guests booting
// Debian's packaged kernels. See README.md in this directory.
//
// The host side (cmd/vmtest) builds the test binaries, fetches kernels, packs an initramfs
// and boots it; the guest side (init) is PID 1 in the guest. They share only the Plan,
// written by the host into the initramfs as PlanPath, and the result-line protocol below.
package vmtests

// Paths inside the guest.
const (
	PlanPath   = "/vmtest/plan.json"
	ModuleDir  = "/vmtest/modules" // <n>-<name>.ko, loaded in name order
	BinDir     = "/vmtest/bin"     // <Package.Name>.test
	SrcDir     = "/vmtest/src"     // <Package.Dir>/testdata, the working directory of each binary
	ResultsTTY = "/dev/ttyS1"      // the second serial port: result lines only
)

// Plan is what the guest init runs.
type Plan struct {
	// Token is random per run and starts every result line's payload, so a test that
	// happens to print "VMTEST-RESULT ..." can never be mistaken for the init.
	Token    string
	Packages []Package
	// Run, if set, is passed as -test.run to every binary.
	Run string
	// Skip, if set, is passed as -test.skip to every binary.
	Skip string
	// TimeoutSec bounds each binary: -test.timeout, then SIGKILL GraceSec later.
	TimeoutSec int
	GraceSec   int
	// MemlockUnlimited raises RLIMIT_MEMLOCK to infinity for the tests, as hosts with
	// LimitMEMLOCK=infinity do. Kernels before 5.11 charge BPF maps and programs against
	// it, and the kernel's default (64 KiB before 5.16) is too small for divert.
	MemlockUnlimited bool

	// Set by the vng runner, whose guest sees the host's file system: where the binaries
	// and sources are, and a file (in a directory shared read-write) for the result lines.
	// Empty means the initramfs layout: BinDir, SrcDir and ResultsTTY.
	BinDir, SrcDir, Results string
}

// Dirs returns where the guest finds the test binaries and package sources, and where it
// writes result lines.
func (p Plan) Dirs() (bin, src, results string) {
	bin, src, results = BinDir, SrcDir, ResultsTTY
	if p.BinDir != "" {
		bin = p.BinDir
	}
	if p.SrcDir != "" {
		src = p.SrcDir
	}
	if p.Results != "" {
		results = p.Results
	}
	return bin, src, results
}

// Package is one test binary.
type Package struct {
	Path string // import-path-like name shown in reports, e.g. ./loader
	Name string // file name under BinDir, without .test
	Dir  string // working directory under SrcDir (the package dir, relative)
}

// Result-line keywords. The init writes "<keyword> <token> <fields...>" lines to
// ResultsTTY (and echoes them to the console for humans):
//
//	VMTEST-KERNEL <token> <uname -r>
//	VMTEST-MODULE <token> <module> <error>                  (a module failed to load)
//	VMTEST-RESULT <token> <package> PASS|FAIL|TIMEOUT <seconds>
//	VMTEST-DONE   <token>
//
// A package without a RESULT line, or a run without DONE, is a failure on the host.
const (
	KeyKernel = "VMTEST-KERNEL"
	KeyModule = "VMTEST-MODULE"
	KeyResult = "VMTEST-RESULT"
	KeyDone   = "VMTEST-DONE"
)

// Outcomes of a package.
const (
	Pass    = "PASS"
	Fail    = "FAIL"
	Timeout = "TIMEOUT"
)
