package vmtests

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A guest that never powers off is killed at the hard timeout and reported as timed out.
// A stand-in qemu-system-x86_64 that sleeps plays the wedged guest.
func TestQemuHardTimeout(t *testing.T) {
	dir := t.TempDir()
	fake := "#!/bin/sh\necho booting\nexec sleep 600\n"
	if err := os.WriteFile(filepath.Join(dir, "qemu-system-x86_64"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	q := Qemu{Kernel: "k", Initrd: "i", MemMB: 64, CPUs: 1, Guest: Guest{Timeout: 500 * time.Millisecond,
		Console: filepath.Join(dir, "console.log"), Results: filepath.Join(dir, "results.log")}}
	start := time.Now()
	timedOut, _, err := q.Run(context.Background())
	if err != nil || !timedOut {
		t.Fatalf("Run = timedOut %v, err %v; want a timeout", timedOut, err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Run returned after %v, want about the 500ms timeout", d)
	}
	if b, _ := os.ReadFile(q.Console); len(b) == 0 {
		t.Error("console log is empty; want the fake's output")
	}

	// A guest that stops reporting is killed after Stall, long before Timeout.
	q.Timeout, q.Stall = time.Hour, 2*time.Second
	start = time.Now()
	timedOut, _, err = q.Run(context.Background())
	if err != nil || !timedOut {
		t.Fatalf("Run with Stall = timedOut %v, err %v; want a timeout", timedOut, err)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("Run returned after %v, want about the 2s stall", d)
	}
}
