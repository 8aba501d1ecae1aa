package testutil_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshdivert/divert/test/testutil"
)

func TestChildRequiresPrivilege(t *testing.T) {
	if os.Getenv("TESTUTIL_CHILD") != "1" {
		t.Skip("run by TestRequirePrivileged only")
	}
	testutil.RequirePrivileged(t)
}

// Skipped for a contributor, a failure in CI: run a child test both ways.
func TestRequirePrivileged(t *testing.T) {
	for _, c := range []struct {
		name, ci, want string
		fails          bool
	}{
		{"contributor", "", "SKIP", false},
		{"CI", "true", "CI must run every test as root", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run", "^TestChildRequiresPrivilege$", "-test.v")
			cmd.Env = append(os.Environ(), "TESTUTIL_CHILD=1", testutil.SkipPrivilegedEnv+"=1", "CI="+c.ci)
			out, err := cmd.CombinedOutput()
			if (err != nil) != c.fails || !strings.Contains(string(out), c.want) {
				t.Fatalf("err %v, want failure %v and %q in:\n%s", err, c.fails, c.want, out)
			}
		})
	}
}
