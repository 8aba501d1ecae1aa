package loader_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/internal/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested()
	os.Exit(m.Run())
}

var attachTypes = []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt}

// assertNothingAttached checks the cgroup has no programs and the bpffs no pins.
func assertNothingAttached(t *testing.T, pod *testpod.Pod, opts loader.Options) {
	t.Helper()
	for _, at := range attachTypes {
		res, err := link.QueryPrograms(link.QueryOptions{Target: cgroupFD(t, pod.CgroupPath), Attach: at})
		if err != nil {
			t.Fatalf("query %s programs: %v", at, err)
		}
		if len(res.Programs) != 0 {
			t.Errorf("%d %s programs still attached to %s", len(res.Programs), at, pod.CgroupPath)
		}
	}
	for _, d := range []string{"divert", "divert_staging"} {
		entries, err := os.ReadDir(filepath.Join(opts.BPFFS, d))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if len(entries) != 0 {
			t.Errorf("%s/%s still holds %v", opts.BPFFS, d, entries)
		}
	}
}

func cgroupFD(t *testing.T, path string) int {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

// A failure at the very last step of attach (everything attached and pinned) must undo it
// all: no programs on the cgroup, no pins, and traffic flows uncaptured.
func TestAttachIsAllOrNothing(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	pod.Net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	pod.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)

	injected := errors.New("injected failure")
	loader.SetTestHookBeforeCommit(func() error {
		// At this point the programs are live on the cgroup: prove it, so the test
		// knows it is undoing real state.
		for _, at := range attachTypes {
			res, err := link.QueryPrograms(link.QueryOptions{Target: cgroupFD(t, pod.CgroupPath), Attach: at})
			if err != nil || len(res.Programs) != 1 {
				t.Errorf("before commit: %s programs = %v, %v; want 1", at, res, err)
			}
		}
		return injected
	})
	defer loader.SetTestHookBeforeCommit(nil)

	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	if err := loader.Attach(context.Background(), lp, divertest.Config(t), opts); !errors.Is(err, injected) {
		t.Fatalf("attach returned %v, want the injected failure", err)
	}
	assertNothingAttached(t, pod, opts)
	res := pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[0], 80)})[0]
	if len(res.Hops) != 1 || res.Hops[0].Who != "remote" {
		t.Fatalf("after a failed attach traffic must not be captured: %+v", res)
	}
}

// Detach removes everything and is idempotent; attach after detach works again.
func TestDetachRemovesEverything(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	cfg := divertest.Config(t)
	for range 2 {
		if err := loader.Attach(context.Background(), lp, cfg, opts); err != nil {
			t.Fatal(err)
		}
		if err := loader.Attach(context.Background(), lp, cfg, opts); err != nil { // update path
			t.Fatal(err)
		}
		if err := loader.Detach(pod.Name, opts); err != nil {
			t.Fatal(err)
		}
		if err := loader.Detach(pod.Name, opts); !errors.Is(err, loader.ErrNotAttached) {
			t.Fatalf("second detach: %v, want ErrNotAttached", err)
		}
		assertNothingAttached(t, pod, opts)
	}
}

// Re-attaching with a new config changes behaviour in place, without re-creating links.
func TestReattachUpdatesInPlace(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	pod.Net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	pod.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
	dst := testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[0], 80)}

	divertest.Attach(t, pod, opts, divertest.Config(t))
	before, err := loader.Status(pod.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := pod.Dial(t, divertest.AppUID, divertest.AppUID, dst)[0]; len(got.Hops) != 1 || got.Hops[0].Who != "proxy" {
		t.Fatalf("default config should capture: %+v", got)
	}
	divertest.Attach(t, pod, opts, divertest.Config(t, "-o", "80"))
	if got := pod.Dial(t, divertest.AppUID, divertest.AppUID, dst)[0]; len(got.Hops) != 1 || got.Hops[0].Who != "remote" {
		t.Fatalf("-o 80 should let the connection pass: %+v", got)
	}
	after, err := loader.Status(pod.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range before.Programs {
		if before.Programs[i].LinkID != after.Programs[i].LinkID {
			t.Errorf("%s: link %d replaced by %d; an update must keep the link", before.Programs[i].Name, before.Programs[i].LinkID, after.Programs[i].LinkID)
		}
	}
	if got := after.Policy.OutboundExcludePorts; len(got) != 1 || got[0] != 80 {
		t.Errorf("status reads back -o %v, want [80]", got)
	}
}

// Re-attaching a pod id to a different cgroup is refused and changes nothing.
func TestReattachOtherCgroupRefused(t *testing.T) {
	pod, other := testpod.New(t), testpod.New(t)
	opts := divertest.BPFFS(t)
	divertest.Attach(t, pod, opts, divertest.Config(t))
	lp := loader.Pod{ID: pod.Name, Cgroup: other.CgroupPath, NetNS: other.NetNSPath}
	err := loader.Attach(context.Background(), lp, divertest.Config(t, "-p", "16001"), opts)
	var ie *loader.InputError
	if !errors.As(err, &ie) || ie.Field != "cgroup" {
		t.Fatalf("attach to another cgroup: %v, want an InputError on cgroup", err)
	}
	st, err := loader.Status(pod.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	if st.Policy.ProxyPort != 15001 {
		t.Errorf("refused attach changed the policy: proxy port %d", st.Policy.ProxyPort)
	}
}
