package loader_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/internal/crashpoint"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

const crashChildEnv = "DIVERT_LOADER_CRASH_CHILD"

// crashJob is one Attach or Detach run by a child process that kills itself (SIGKILL)
// right after its KillAt-th step (see testHookStep), or finishes if it has fewer.
type crashJob struct {
	Op     string // "attach" or "detach"
	Pod    loader.Pod
	BPFFS  string
	Flags  []string // policy flags, for attach
	NoOut  bool     // attach without outbound capture
	KillAt int
}

func runCrashChildIfRequested() {
	v := os.Getenv(crashChildEnv)
	if v == "" {
		return
	}
	var job crashJob
	if err := json.Unmarshal([]byte(v), &job); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	n := 0
	crashpoint.Hook = func(step string) {
		n++
		fmt.Println(step)
		if n == job.KillAt {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	}
	opts := loader.Options{BPFFS: job.BPFFS, NoOutbound: job.NoOut}
	var err error
	if job.Op == "detach" {
		err = loader.Detach(job.Pod.ID, opts)
	} else {
		var cfg policy.Config
		if cfg, err = parseFlags(job.Flags); err == nil {
			err = loader.Attach(context.Background(), job.Pod, &cfg, opts)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func parseFlags(args []string) (policy.Config, error) {
	return policy.ParseArgs(policy.Default(), args...)
}

// runCrashJob runs job in a child and returns the steps it passed; killed says whether
// it died at step KillAt (else it finished).
func runCrashJob(t *testing.T, job crashJob) (steps []string, killed bool) {
	t.Helper()
	b, _ := json.Marshal(job)
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+string(b))
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	steps = strings.Fields(strings.ReplaceAll(strings.TrimSpace(out.String()), " ", "_"))
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return steps, true
		}
		t.Fatalf("crash child %s: %v: %s", job.Op, err, errOut.String())
	}
	if err != nil {
		t.Fatal(err)
	}
	return steps, false
}

// A loader killed (SIGKILL) after any step of a create, an update or a detach leaves the
// pod captured whole or not at all, and the same call run again repairs it: attached once
// with the new policy as the kernel holds it, or nothing left. Every step is tried, in a
// child process that kills itself there.
func TestCrashAtEveryStep(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	probe := divertest.NewCrashProbe(t, pod)
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	a := []string{}
	b := []string{"-o", "3306", "-x", "10.96.0.0/12", "-d", "15090,15021,15020,9000"}
	cfgB := divertest.Config(t, b...)
	ctx := context.Background()

	for _, tc := range []struct {
		name, op      string
		from          []string // attached with these flags before, nil: not attached
		fromNoOut, to bool     // outbound off before; after (attach only)
	}{
		{"create", "attach", nil, false, false},
		{"update", "attach", a, false, false},
		{"detach", "detach", a, false, false},
		{"outbound on", "attach", a, true, false},
		{"outbound off", "attach", a, false, true},
	} {
		toOpts := loader.Options{BPFFS: opts.BPFFS, NoOutbound: tc.to}
		k := 1
		for ; ; k++ {
			if tc.from == nil {
				if err := loader.Detach(pod.Name, opts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
					t.Fatal(err)
				}
			} else if err := loader.Attach(ctx, lp, divertest.Config(t, tc.from...), loader.Options{BPFFS: opts.BPFFS, NoOutbound: tc.fromNoOut}); err != nil {
				t.Fatal(err)
			}
			steps, killed := runCrashJob(t, crashJob{Op: tc.op, Pod: lp, BPFFS: opts.BPFFS, Flags: b, NoOut: tc.to, KillAt: k})
			if !killed {
				break
			}
			at := fmt.Sprintf("%s killed after step %d (%s)", tc.name, k, steps[len(steps)-1])
			failed := false
			fail := func(format string, args ...any) {
				t.Errorf(at+": "+format, args...)
				failed = true
			}
			var captured bool
			var err error
			if tc.fromNoOut || tc.to {
				// A direction turned on or off: inbound stays captured, outbound is
				// captured whole or not at all.
				var in bool
				if captured, in, _, err = probe.Directions(t); err != nil || !in {
					fail("inbound captured %v, %v", in, err)
				}
				captured = captured || in
			} else if captured, err = probe.Captured(t); err != nil {
				fail("%v", err)
			}
			// A pod directory left behind says whether it is captured: inert or not.
			if _, err := os.Stat(loader.PinDir(opts, pod.Name)); err == nil {
				if inert, err := loader.Inert(pod.Name, opts); err != nil || inert == captured {
					fail("captured %v, and its pins say inert %v (%v)", captured, inert, err)
				}
			}
			if tc.op == "detach" {
				if err := loader.Detach(pod.Name, opts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
					fail("detach again: %v", err)
				} else if err := divertest.CheckNothingLeft(pod, opts); err != nil {
					fail("after detach again: %v", err)
				}
			} else {
				if err := loader.Attach(ctx, lp, cfgB, toOpts); err != nil {
					fail("attach again: %v", err)
				} else if err := divertest.CheckAttachedOnce(pod, toOpts, pod.Name); err != nil {
					fail("after attach again: %v", err)
				} else if err := divertest.CheckPolicy(opts, pod.Name, cfgB); err != nil {
					fail("after attach again: %v", err)
				} else if out, in, _, err := probe.Directions(t); err != nil || !in || out == tc.to {
					fail("after attach again: outbound captured %v, inbound %v, %v", out, in, err)
				}
			}
			if failed {
				if err := divertest.ForceClean(opts); err != nil {
					t.Fatalf("clean up after a failed iteration: %v", err)
				}
			}
		}
		t.Logf("%s: killed after each of its %d steps", tc.name, k-1)
	}
}

// divert gc also clears what a killed attach left in staging (links pinned there keep
// their programs attached, inert), whichever pod it was for.
func TestGCClearsStaging(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	t.Cleanup(func() { divertest.ForceClean(opts) })
	steps, _ := runCrashJob(t, crashJob{Op: "attach", Pod: lp, BPFFS: opts.BPFFS})
	if err := loader.Detach(pod.Name, opts); err != nil {
		t.Fatal(err)
	}
	at := slices.Index(steps, "pin_divert_sk_lookup") + 1
	if at == 0 {
		t.Fatalf("no step pin_divert_sk_lookup in %v", steps)
	}
	runCrashJob(t, crashJob{Op: "attach", Pod: lp, BPFFS: opts.BPFFS, KillAt: at})
	if kinds, _ := divertest.ProgramsByKind(pod); kinds[ebpf.AttachSkLookup] != 1 {
		t.Fatalf("the killed attach left %v attached, want sk_lookup among them", kinds)
	}
	if _, err := loader.GC(opts); err != nil {
		t.Fatal(err)
	}
	if err := divertest.CheckNothingLeft(pod, opts); err != nil {
		t.Fatalf("after gc: %v", err)
	}
}
