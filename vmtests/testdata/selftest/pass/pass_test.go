// Package pass is a vmtests self-test: it passes, and checks it runs in a vmtests guest.
package pass

import (
	"os"
	"testing"
)

func TestInGuest(t *testing.T) {
	if b, err := os.ReadFile("/proc/1/cmdline"); err != nil || string(b) != "/init\x00" {
		t.Fatalf("PID 1 is %q (%v), want the vmtests init", b, err)
	}
}
