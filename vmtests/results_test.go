package vmtests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var testPkgs = []Package{{Path: "./a"}, {Path: "./b"}, {Path: "./c"}}

func outcomes(g GuestResult) string {
	var s []string
	for _, p := range g.Packages {
		s = append(s, p.Package+"="+p.Outcome)
	}
	return strings.Join(s, " ")
}

// The host must never turn a missing, foreign or malformed line into a pass, and may boot
// a guest again (DiedBooting) only if it reported nothing at all: once the init has
// spoken, a death is a test's failure.
func TestParseGuest(t *testing.T) {
	const tok = "t0k"
	for _, tc := range []struct {
		name, results, console string
		timedOut               bool
		want                   string
		ok, diedBooting        bool
	}{
		{
			name:    "panic during boot",
			console: "[   11.895856] Kernel panic - not syncing: Fatal exception in interrupt\n",
			want:    "./a=FAIL ./b=FAIL ./c=FAIL", diedBooting: true,
		},
		{
			name: "hung during boot", timedOut: true,
			want: "./a=TIMEOUT ./b=TIMEOUT ./c=TIMEOUT", diedBooting: true,
		},
		{
			name:    "only another run's lines",
			results: "VMTEST-KERNEL other 6.12.0\nVMTEST-RESULT other ./a PASS 1\n",
			want:    "./a=FAIL ./b=FAIL ./c=FAIL", diedBooting: true,
		},
		{
			name:    "panic after the init's first line",
			results: "VMTEST-KERNEL t0k 6.12.0\n",
			console: "[ 30.0] Kernel panic - not syncing: Fatal exception\n",
			want:    "./a=FAIL ./b=FAIL ./c=FAIL",
		},
		{
			name:    "all pass",
			results: "VMTEST-KERNEL t0k 6.1.0\r\nVMTEST-RESULT t0k ./a PASS 1.0\r\nVMTEST-RESULT t0k ./b PASS 2\nVMTEST-RESULT t0k ./c PASS 0.1\nVMTEST-DONE t0k\n",
			want:    "./a=PASS ./b=PASS ./c=PASS", ok: true,
		},
		{
			name:    "no DONE line",
			results: "VMTEST-RESULT t0k ./a PASS 1\nVMTEST-RESULT t0k ./b PASS 1\nVMTEST-RESULT t0k ./c PASS 1\n",
			want:    "./a=PASS ./b=PASS ./c=PASS", ok: false,
		},
		{
			name:    "crash after the first package",
			results: "VMTEST-RESULT t0k ./a PASS 1\n",
			console: "[ 3.1] Kernel panic - not syncing: Attempted to kill init!\n",
			want:    "./a=PASS ./b=FAIL ./c=FAIL",
		},
		{
			name:    "a kernel BUG fails the run even when every package passed",
			results: "VMTEST-RESULT t0k ./a PASS 1\nVMTEST-RESULT t0k ./b PASS 1\nVMTEST-RESULT t0k ./c PASS 1\nVMTEST-DONE t0k\n",
			console: "[   12.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000\r\n",
			want:    "./a=PASS ./b=PASS ./c=PASS",
		},
		{
			name:     "host timeout",
			results:  "VMTEST-RESULT t0k ./a PASS 1\n",
			timedOut: true,
			want:     "./a=PASS ./b=TIMEOUT ./c=TIMEOUT",
		},
		{
			name:    "wrong token or malformed lines are ignored",
			results: "VMTEST-RESULT other ./a PASS 1\nVMTEST-RESULT t0k ./b PASSED 1\nVMTEST-RESULT t0k ./c PASS\nVMTEST-DONE t0k\n",
			want:    "./a=FAIL ./b=FAIL ./c=FAIL",
		},
		{
			name:    "failures and timeouts",
			results: "VMTEST-RESULT t0k ./a FAIL 1\nVMTEST-RESULT t0k ./b TIMEOUT 600\nVMTEST-RESULT t0k ./c PASS 1\nVMTEST-DONE t0k\n",
			want:    "./a=FAIL ./b=TIMEOUT ./c=PASS",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := ParseGuest(tok, testPkgs, tc.results, tc.console, tc.timedOut)
			if got := outcomes(g); got != tc.want {
				t.Errorf("outcomes %q, want %q", got, tc.want)
			}
			if g.OK() != tc.ok {
				t.Errorf("OK() = %v, want %v (problems %q)", g.OK(), tc.ok, g.Problems)
			}
			if g.DiedBooting() != tc.diedBooting {
				t.Errorf("DiedBooting() = %v, want %v", g.DiedBooting(), tc.diedBooting)
			}
		})
	}
}

func TestFailReason(t *testing.T) {
	console := "=== VMTEST ./a: /vmtest/bin/a.test -test.v\n=== RUN   TestX\n--- FAIL: TestX (0.1s)\n    --- FAIL: TestX/sub (0.1s)\n--- PASS: TestY (0s)\n--- FAIL: TestZ (2s)\nFAIL\n" +
		"=== VMTEST ./b: /vmtest/bin/b.test -test.v\npanic: test timed out after 10m0s\n"
	g := ParseGuest("t", testPkgs[:2], "VMTEST-RESULT t ./a FAIL 1\nVMTEST-RESULT t ./b TIMEOUT 600\nVMTEST-DONE t\n", console, false)
	if got, want := g.Packages[0].Reason, "failed: TestX, TestZ"; got != want {
		t.Errorf("reason %q, want %q", got, want)
	}
	if got, want := g.Packages[1].Reason, "panic: test timed out after 10m0s"; got != want {
		t.Errorf("reason %q, want %q", got, want)
	}
}

func TestFailureExcerpt(t *testing.T) {
	out := `=== RUN   TestA
=== RUN   TestA/one
    x_test.go:4: fine
=== RUN   TestA/two
=== RUN   TestA/two/deep
    x_test.go:5: before
[   12.345678] a kernel line
    x_test.go:5: bad
          second line
=== NAME  TestA
    x_test.go:6: after
=== RUN   TestB
    x_test.go:9: lonely
--- FAIL: TestA (0.00s)
    --- PASS: TestA/one (0.00s)
    --- FAIL: TestA/two (0.00s)
        --- FAIL: TestA/two/deep (0.00s)
--- FAIL: TestB (0.00s)
FAIL
`
	want := `--- FAIL: TestA/two/deep
    x_test.go:5: before
[   12.345678] a kernel line
    x_test.go:5: bad
          second line
--- FAIL: TestB
    x_test.go:9: lonely
`
	if got := failureExcerpt(out); got != want {
		t.Errorf("excerpt:\n%s\nwant:\n%s", got, want)
	}
	var long strings.Builder
	long.WriteString("=== RUN   TestC\n")
	for i := range excerptLines + 5 {
		fmt.Fprintf(&long, "    line %d\n", i)
	}
	long.WriteString("--- FAIL: TestC (1s)\n")
	got := failureExcerpt(long.String())
	if !strings.Contains(got, "... 5 lines before\n    line 5\n") || !strings.HasSuffix(got, fmt.Sprintf("line %d\n", excerptLines+4)) {
		t.Errorf("a long output is not cut to its last %d lines:\n%s", excerptLines, got)
	}
}

func TestReadKernels(t *testing.T) {
	ks, err := ReadKernels("kernels.txt")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, k := range ks {
		names[k.Name] = true
	}
	for _, n := range []string{"5.10", "6.1", "6.12"} {
		if !names[n] {
			t.Errorf("kernels.txt has no %s kernel", n)
		}
	}
	bad := filepath.Join(t.TempDir(), "k.txt")
	os.WriteFile(bad, []byte("6.1 bookworm linux-image-6.1.0-50-amd64\n"), 0o644)
	if _, err := ReadKernels(bad); err == nil {
		t.Error("a line without =version was accepted")
	}
}
