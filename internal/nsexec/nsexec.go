// Package nsexec runs code and commands inside a network namespace given by path.
//
// Namespaces belong to OS threads, so the work runs on a locked thread that joins the
// namespace and comes back afterwards. A command started there is forked from that thread
// and so is born inside the namespace; `ip netns exec` is avoided because it remounts /sys
// and hides the cgroup tree.
package nsexec

import (
	"errors"
	"fmt"
	"os/exec"
	"runtime"
	"sync"

	"github.com/vishvananda/netns"
)

// Do runs fn on an OS thread inside the network namespace at path.
func Do(path string, fn func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer target.Close()

	errc := make(chan error, 1)
	// A fresh goroutine keeps the caller's thread untouched; if restoring the original
	// namespace fails, the thread stays locked and the runtime discards it on exit.
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("leave network namespace %s: %w", path, err) // thread stays locked
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Start starts cmd inside the network namespace at path.
//
// The fork happens on one dedicated OS thread that stays locked and alive for the life of
// the process. A child's Pdeathsig fires when the *thread* that forked it exits, and Go
// destroys threads that a goroutine leaves locked (code that unshares a namespace does
// that on purpose): a child forked from a pooled thread could be killed at a random later
// moment. From the spawner thread it dies only with its parent process.
func Start(path string, cmd *exec.Cmd) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer target.Close()
	return onSpawner(func(home netns.NsHandle) error {
		if err := netns.Set(target); err != nil {
			return fmt.Errorf("enter network namespace %s: %w", path, err)
		}
		startErr := cmd.Start()
		if err := netns.Set(home); err != nil {
			// The spawner must never fork in the wrong namespace again, and its thread
			// must not exit (its children's Pdeathsig): park it and start another.
			spawnerBroken = true
			return errors.Join(startErr, fmt.Errorf("leave network namespace %s: %w", path, err))
		}
		return startErr
	})
}

var (
	spawnerMu     sync.Mutex
	spawnerReqs   chan func(netns.NsHandle)
	spawnerBroken bool
)

// onSpawner runs fn on the spawner thread; home is that thread's own namespace.
func onSpawner(fn func(home netns.NsHandle) error) error {
	spawnerMu.Lock()
	defer spawnerMu.Unlock()
	if spawnerReqs == nil || spawnerBroken {
		spawnerBroken = false
		reqs := make(chan func(netns.NsHandle))
		ready := make(chan error)
		go func() {
			runtime.LockOSThread() // never unlocked, never returns: the thread lives on
			home, err := netns.Get()
			ready <- err
			if err != nil {
				select {} // keep the thread (and any child's Pdeathsig) alive
			}
			for req := range reqs {
				req(home)
			}
			select {}
		}()
		if err := <-ready; err != nil {
			return fmt.Errorf("start spawner thread: %w", err)
		}
		spawnerReqs = reqs
	}
	errc := make(chan error, 1)
	spawnerReqs <- func(home netns.NsHandle) { errc <- fn(home) }
	return <-errc
}

// CombinedOutput runs cmd inside the network namespace at path and returns its output.
func CombinedOutput(path string, cmd *exec.Cmd) ([]byte, error) {
	var out []byte
	err := Do(path, func() error {
		var err error
		out, err = cmd.CombinedOutput()
		return err
	})
	return out, err
}
