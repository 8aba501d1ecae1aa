package nsexec

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshdivert/divert/test/testutil"

	"golang.org/x/sys/unix"
)

// Children with Pdeathsig started by Start survive goroutines that lock a thread and throw
// it away (as netns-creating code does): they are forked from the long-lived spawner
// thread, not from a pooled thread that may later be destroyed.
func TestStartSurvivesDiscardedThreads(t *testing.T) {
	testutil.RequirePrivileged(t)
	const children, burners = 16, 64
	var cmds []*exec.Cmd
	exited := make(chan *exec.Cmd, children)
	for range children {
		cmd := exec.Command("sleep", "30")
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		// Start from goroutines on busy, locked threads, so forks cannot all come from
		// the main thread (which the runtime never destroys).
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			if err := Start("/proc/self/ns/net", cmd); err != nil {
				t.Error(err)
			}
		}()
		wg.Wait()
		if cmd.Process == nil {
			t.FailNow()
		}
		cmds = append(cmds, cmd)
		go func() { cmd.Wait(); exited <- cmd }()
	}
	defer func() {
		for _, c := range cmds {
			c.Process.Kill()
		}
	}()
	for round := 0; round < 4; round++ {
		var locked, release sync.WaitGroup
		locked.Add(burners)
		release.Add(1)
		for range burners {
			go func() {
				runtime.LockOSThread()
				unix.Unshare(unix.CLONE_NEWUTS)
				locked.Done()
				release.Wait() // exit while locked: the runtime destroys the thread
			}()
		}
		locked.Wait()
		release.Done()
	}
	select {
	case c := <-exited:
		t.Fatalf("child killed when a pooled thread was destroyed: %v", c.ProcessState)
	case <-time.After(300 * time.Millisecond):
	}
}
