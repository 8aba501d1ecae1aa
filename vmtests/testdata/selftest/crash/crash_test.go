// Package crash is a vmtests self-test that crashes the guest kernel (sysrq c), so neither
// it nor any later package reports a result: the runner must count them as failed.
package crash

import (
	"os"
	"testing"
	"time"
)

func TestCrashesKernel(t *testing.T) {
	if err := os.WriteFile("/proc/sysrq-trigger", []byte("c"), 0); err != nil {
		t.Fatalf("sysrq-trigger: %v", err)
	}
	time.Sleep(time.Hour) // the kernel is gone by now
}
