package loader_test

import (
	"context"
	"testing"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// Detach ends capture at once even while another process holds the pod's links (`divert
// status` reading them, a second agent): unpinning alone would leave every held link
// attached until its last reference goes, and the kernel frees even an unreferenced link
// only later, from a work item. Outbound and inbound connections made right after Detach
// reach their real destinations.
func TestDetachWhileLinksHeld(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	probe := divertest.NewCrashProbe(t, pod) // remote :80, app :8080, proxy :15001 and :15006

	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	for _, step := range []string{"first attach", "attach after detach"} {
		if err := loader.Attach(context.Background(), lp, divertest.Config(t), opts); err != nil {
			t.Fatal(err)
		}
		probe.Landed(t, step, "proxy", "proxy")
		checkDetached := divertest.HoldLinks(t, opts, pod.Name)
		if err := loader.Detach(lp.ID, opts); err != nil {
			t.Fatal(err)
		}
		divertest.AssertNothingAttached(t, pod, opts)
		checkDetached()
		probe.Landed(t, step+", detached", "remote", "app")
	}
}
