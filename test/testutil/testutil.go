// Package testutil holds what every test package of divert shares.
package testutil

import (
	"os"
	"testing"
)

// SkipPrivilegedEnv, set to 1, makes privileged tests skip even as root (make unit).
const SkipPrivilegedEnv = "DIVERT_TEST_UNPRIVILEGED"

// RequirePrivileged marks a test that touches the kernel (namespaces, cgroups, BPF,
// iptables) and so needs root. Without root (or with SkipPrivilegedEnv=1) it skips, so a
// contributor's plain `go test ./...` runs what it can; where the CI variable is set (CI
// runs as root) it fails instead, as a privileged test must never be skipped there
// (cilium/ebpf's pattern). Fixtures call it, so a test that uses one needs nothing more.
func RequirePrivileged(tb testing.TB) {
	tb.Helper()
	switch {
	case os.Getenv(SkipPrivilegedEnv) == "1":
		skip(tb, SkipPrivilegedEnv+"=1")
	case os.Geteuid() != 0:
		skip(tb, "not root")
	}
}

// RequireRoot is RequirePrivileged for a test that needs uid 0 but changes nothing in the
// kernel (a server that answers root peers only), so make unit, run as root, keeps it.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		skip(tb, "not root")
	}
}

func skip(tb testing.TB, reason string) {
	tb.Helper()
	if os.Getenv("CI") != "" {
		tb.Fatalf("privileged test cannot run (%s) and CI is set: CI must run every test as root", reason)
	}
	tb.Skipf("privileged test skipped (%s); make test runs it as root", reason)
}
