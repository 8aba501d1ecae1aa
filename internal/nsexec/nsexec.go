// Package nsexec runs code and commands inside a network namespace given by path.
//
// Namespaces belong to OS threads, so the work runs on a locked thread that joins the
// namespace and comes back afterwards. A command started there is forked from that thread
// and so is born inside the namespace; `ip netns exec` is avoided because it remounts /sys
// and hides the cgroup tree.
package nsexec

import (
	"fmt"
	"os/exec"
	"runtime"

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
func Start(path string, cmd *exec.Cmd) error {
	return Do(path, cmd.Start)
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
