package loader_test

import (
	"context"
	"net/netip"
	"testing"

	"github.com/meshdivert/divert/internal/divertest"
	"github.com/meshdivert/divert/loader"
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
	any := netip.IPv4Unspecified()
	pod.Net.Server(t, "remote", netip.AddrPortFrom(any, 80))
	pod.Server(t, "app", netip.AddrPortFrom(any, 8080), divertest.AppUID, divertest.AppUID)
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: divertest.ProxyUID, GID: divertest.ProxyUID,
		Listen: []netip.AddrPort{netip.AddrPortFrom(any, 15001), netip.AddrPortFrom(any, 15006)}})
	out := testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[0], 80)}
	in := testpod.Target{Dst: netip.AddrPortFrom(pod.Addr, 8080)}
	landed := func(step string, wantOut, wantIn string) {
		t.Helper()
		if r := pod.Dial(t, divertest.AppUID, divertest.AppUID, out)[0]; len(r.Hops) != 1 || r.Hops[0].Who != wantOut {
			t.Errorf("%s: outbound landed %+v, want %s", step, r, wantOut)
		}
		if r := pod.Net.Dial(t, in)[0]; len(r.Hops) != 1 || r.Hops[0].Who != wantIn {
			t.Errorf("%s: inbound landed %+v, want %s", step, r, wantIn)
		}
	}

	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	for _, step := range []string{"first attach", "attach after detach"} {
		if err := loader.Attach(context.Background(), lp, divertest.Config(t), opts); err != nil {
			t.Fatal(err)
		}
		landed(step, "proxy", "proxy")
		checkDetached := divertest.HoldLinks(t, opts, pod.Name)
		if err := loader.Detach(lp.ID, opts); err != nil {
			t.Fatal(err)
		}
		divertest.AssertNothingAttached(t, pod, opts)
		checkDetached()
		landed(step+", detached", "remote", "app")
	}
}
