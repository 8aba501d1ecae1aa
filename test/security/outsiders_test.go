package security

import (
	"fmt"
	"net/netip"
	"slices"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// TestStatusFindsProcessesOutsideTheCgroup: what divert status reports for the escape of
// TestPassedSocketEscapes. A process in the pod's netns but another cgroup is listed; the
// pod's own processes, one in a cgroup below the pod's, and one outside the pod's cgroup in
// another netns are not. With inbound capture off (no sk_lookup to name the netns) the
// netns is the one the pod's processes are in.
func TestStatusFindsProcessesOutsideTheCgroup(t *testing.T) {
	for _, args := range [][]string{nil, {"-b", ""}} {
		t.Run(fmt.Sprint(args), func(t *testing.T) {
			pod := testpod.New(t)
			opts := divertest.BPFFS(t)
			divertest.Attach(t, pod, opts, divertest.Config(t, args...))
			pod.Server(t, "app", netip.MustParseAddrPort("0.0.0.0:8080"), divertest.AppUID, divertest.AppUID)
			below := divertest.ChildCgroup(t, pod.CgroupPath, "container")
			sleepIn(t, pod.NetNSPath, below)
			sleepIn(t, pod.Net.NetNSPath, pod.Net.CgroupPath)
			outsider := sleepIn(t, pod.NetNSPath, pod.Net.CgroupPath)

			st, err := loader.Status(pod.Name, opts)
			if err != nil {
				t.Fatal(err)
			}
			st.CheckOutsiders("/proc", divertest.Cgroup2Mount(t))
			if st.OutsideCgroupUnchecked != "" || !slices.Equal(st.OutsideCgroup, []int{outsider}) {
				t.Errorf("status lists %v outside the pod's cgroup (unchecked: %q), want only %d", st.OutsideCgroup, st.OutsideCgroupUnchecked, outsider)
			}
		})
	}
}

// sleepIn starts a process that waits in netns and cgroup until the test ends.
func sleepIn(t *testing.T, netns, cgroup string) int {
	t.Helper()
	cg, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cg)
	cmd := testpod.HelperCommand("escape", `{"mode":"idle"}`) // no sleep(1) in the vmtests guests
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg, Pdeathsig: syscall.SIGKILL}
	if err := nsexec.Start(netns, cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }) // by its PID
	return cmd.Process.Pid
}
