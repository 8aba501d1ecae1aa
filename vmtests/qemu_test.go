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

// A results file that stays empty is given up on after the boot limit; one that has grown
// only after the stall limit, counted from its last growth; with no stall limit, never.
func TestWatchStallBootThenStall(t *testing.T) {
	dir := t.TempDir()
	empty, absent, spoke := filepath.Join(dir, "empty.log"), filepath.Join(dir, "absent.log"), filepath.Join(dir, "spoke.log")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(spoke, []byte("KERNEL tok 6.12\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name        string
		path        string
		boot, stall time.Duration
		kill        bool
	}{
		{"empty: boot limit", empty, 2 * time.Second, time.Hour, true},
		{"absent: boot limit", absent, 2 * time.Second, time.Hour, true},
		{"spoke: stall limit", spoke, time.Hour, 2 * time.Second, true},
		{"spoke: no stall limit", spoke, 500 * time.Millisecond, 0, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			// A kill comes a tick after its limit; the bound only ends a watch that never kills.
			wait := 4 * time.Second
			if c.kill {
				wait = 30 * time.Second
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			killed := false
			WatchStall(ctx, c.path, c.boot, c.stall, func() { killed = true })
			if killed != c.kill {
				t.Errorf("WatchStall(boot %v, stall %v) killed %v within %v, want %v", c.boot, c.stall, killed, wait, c.kill)
			}
		})
	}
}
