// Package pass is a vmtests self-test: it passes, and checks the vmtests init ran it.
package pass

import (
	"os"
	"testing"
)

func TestInGuest(t *testing.T) {
	if os.Getenv("VMTEST_GUEST") != "1" {
		t.Fatal("VMTEST_GUEST is not 1: not run by the vmtests init")
	}
}
