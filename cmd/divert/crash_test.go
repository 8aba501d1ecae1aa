package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/internal/crashpoint"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

var (
	crashSeed  = flag.Uint64("crash.seed", 0, "seed for the kill times of TestCLIKilled (0: a new one, printed)")
	crashKills = flag.Int("crash.kills", 160, "kills in TestCLIKilled, spread over create, update and detach")
)

const cliChildEnv = "DIVERT_CLI_CHILD"

// runCLIChildIfRequested makes the test binary the divert CLI, for tests that must kill it.
func runCLIChildIfRequested() {
	if os.Getenv(cliChildEnv) != "1" {
		return
	}
	crashpoint.ArmFromEnv()
	if err := run(context.Background(), os.Args[1:], env{stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}); err != nil {
		fmt.Fprintln(os.Stderr, "divert:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// cliCmd is the CLI as a child process, not started yet.
func cliCmd(args []string) (*exec.Cmd, *bytes.Buffer) {
	return divertest.ChildCmd(cliChildEnv+"=1", args...)
}

// divert attach (create, then update with another policy) and divert detach, killed with
// SIGKILL at random times (seeded; -crash.seed replays, -crash.kills runs longer): after
// each kill the pod is captured whole or not at all (an update never uncaptures it), and
// the same command run again repairs: attached once with its policy as the kernel holds
// it, or nothing left.
func TestCLIKilled(t *testing.T) {
	rng, seed := divertest.CrashRand(t, *crashSeed, "crash.seed")

	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	probe := divertest.NewCrashProbe(t, pod)
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", pod.Name, "--bpffs", opts.BPFFS) })
	attach := func(flags ...string) []string {
		return append([]string{"attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS}, flags...)
	}
	policies := [][]string{{"-o", "3306", "-x", "10.96.0.0/12", "-d", "15090,15021,15020,9000"}, {"-o", "5432", "-x", "10.0.0.0/8"}}
	type command struct {
		name  string
		args  []string
		flags []string // the policy it attaches; nil for detach
	}
	// A cycle: each command starts from the state the previous one's re-run left.
	cycle := []command{
		{"create", attach(policies[0]...), policies[0]},
		{"update", attach(policies[1]...), policies[1]},
		{"update", attach(policies[0]...), policies[0]},
		{"detach", []string{"detach", "--pod-id", pod.Name, "--bpffs", opts.BPFFS}, nil},
	}

	// How long each command takes uninterrupted and its steps: kills are spread over that.
	var names []string
	for _, c := range cycle {
		names = append(names, c.name)
	}
	plans := divertest.KillPlans(t, names, func(i int) (*exec.Cmd, *bytes.Buffer) { return cliCmd(cycle[i].args) })

	ended := 0                  // kills that came before the command ended
	outcome := map[string]int{} // what the kills left, by command
	begin := time.Now()
	for i := range *crashKills {
		c := cycle[i%len(cycle)]
		cmd, out := cliCmd(c.args)
		killed, aim, err := plans[c.name].Kill(rng, cmd)
		_, last := crashpoint.Steps(out.String())
		at := fmt.Sprintf("kill %d (%s, %s, last step %q, seed %d)", i, c.name, aim, last, seed)
		if err != nil {
			t.Fatalf("%s: %v\n%s", at, err, out)
		}
		if killed {
			ended++
		}

		captured, err := probe.Captured(t)
		if err != nil {
			t.Fatalf("%s: %v", at, err)
		}
		if _, err := os.Stat(loader.PinDir(opts, pod.Name)); err == nil && !captured {
			if out, err := runCLI(t, nil, "status", "--pod-id", pod.Name, "--bpffs", opts.BPFFS); err != nil || !strings.Contains(out, "inert") {
				t.Fatalf("%s: divert status of an uncaptured pod with pins must say it is inert: %v\n%s", at, err, out)
			}
		}
		if c.name == "update" && !captured {
			t.Fatalf("%s: an interrupted update left the pod uncaptured", at)
		}
		outcome[fmt.Sprintf("%s: killed=%v captured=%v", c.name, killed, captured)]++

		// The same command again repairs.
		if _, err := runCLI(t, nil, c.args...); err != nil {
			t.Fatalf("%s: run again: %v", at, err)
		}
		if c.flags == nil {
			if err := divertest.CheckNothingLeft(pod, opts); err != nil {
				t.Fatalf("%s: after detach again: %v", at, err)
			}
			continue
		}
		if err := divertest.CheckAttachedOnce(pod, opts, pod.Name); err != nil {
			t.Fatalf("%s: after attach again: %v", at, err)
		}
		if err := divertest.CheckPolicy(opts, pod.Name, divertest.Config(t, c.flags...)); err != nil {
			t.Fatalf("%s: after attach again: %v", at, err)
		}
	}
	var lines []string
	for k, n := range outcome {
		lines = append(lines, fmt.Sprintf("%s: %d", k, n))
	}
	slices.Sort(lines)
	t.Logf("%d kills (%d before the command ended) in %v\n%s", *crashKills, ended, time.Since(begin).Round(time.Millisecond), strings.Join(lines, "\n"))
}
