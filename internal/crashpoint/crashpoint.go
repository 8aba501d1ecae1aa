// Package crashpoint names the points where the loader changes the kernel or the bpffs, so
// crash tests can kill a process exactly there. Outside tests Hook is nil and Step does
// nothing.
package crashpoint

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Hook, when set (by tests only), runs after every named step.
var Hook func(step string)

// Step reports that step is done.
func Step(step string) {
	if Hook != nil {
		Hook(step)
	}
}

// Env is the variable ArmFromEnv reads: "N,D" kills the process (SIGKILL) D nanoseconds
// after its N-th step (the process goes on meanwhile); "0,0" only lists the steps.
const Env = "DIVERT_CRASHPOINT"

// Prefix starts the line written to stderr for every step passed.
const Prefix = "crashpoint: "

// ArmFromEnv sets Hook as Env says, for a test's child process; without Env it does
// nothing. Only test binaries call it.
func ArmFromEnv() {
	v, ok := os.LookupEnv(Env)
	if !ok {
		return
	}
	at, delay, _ := strings.Cut(v, ",")
	n, _ := strconv.Atoi(at)
	d, _ := strconv.ParseInt(delay, 10, 64)
	seen := 0
	Hook = func(step string) {
		seen++
		fmt.Fprintln(os.Stderr, Prefix+step)
		if seen == n {
			kill := func() { syscall.Kill(os.Getpid(), syscall.SIGKILL) }
			if d == 0 {
				kill()
				select {}
			}
			time.AfterFunc(time.Duration(d), kill)
		}
	}
}

// Steps counts the steps listed in a child's output.
func Steps(output string) (n int, last string) {
	for _, l := range strings.Split(output, "\n") {
		if s, ok := strings.CutPrefix(l, Prefix); ok {
			n, last = n+1, s
		}
	}
	return n, last
}
