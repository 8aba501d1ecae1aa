// Package divertest holds fixtures shared by the privileged suites: a private bpffs per
// test, attaching divert to a testpod.Pod, and parsing istio-iptables flags into a Config.
package divertest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/test/testutil"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testpod"
)

// ProxyUID is the proxy's uid and gid in every suite, as in Istio.
const ProxyUID = 1337

// AppUID is an ordinary application uid.
const AppUID = 1000

// Config parses istio-iptables flags (with divert's defaults) or fails the test.
func Config(tb testing.TB, args ...string) *policy.Config {
	tb.Helper()
	cfg, err := policy.ParseArgs(policy.Default(), args...)
	if err != nil {
		tb.Fatalf("parse %q: %v", args, err)
	}
	return &cfg
}

// BPFFS mounts a private bpffs for the test, so pins never touch the host's /sys/fs/bpf,
// and unmounts it afterwards (which also drops every pin left in it).
func BPFFS(tb testing.TB) loader.Options {
	tb.Helper()
	testutil.RequirePrivileged(tb)
	dir := tb.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		tb.Fatalf("mount bpffs at %s: %v", dir, err)
	}
	tb.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			tb.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return loader.Options{BPFFS: dir}
}

// IPTablesBackends are the iptables flavours istio-iptables runs with.
var IPTablesBackends = []iptables.Backend{iptables.BackendNFT, iptables.BackendLegacy}

// ApplyIPTables installs cfg as istio's rules (backend b) in pod's netns and removes them at
// the end of the test, checking that the cleanup works.
func ApplyIPTables(tb testing.TB, pod *testpod.Pod, b iptables.Backend, cfg *policy.Config) {
	tb.Helper()
	o := iptables.Options{Backend: b}
	if _, err := o.Apply(context.Background(), pod.NetNSPath, cfg); err != nil {
		tb.Fatalf("apply istio's %s rules: %v", b, err)
	}
	tb.Cleanup(func() {
		if err := o.Cleanup(context.Background(), pod.NetNSPath); err != nil {
			tb.Errorf("clean up istio's %s rules: %v", b, err)
		}
	})
}

// Attached is a pod with divert attached.
type Attached struct {
	Pod  *testpod.Pod
	Opts loader.Options
}

// Attach attaches divert to pod with cfg (a second call updates in place) and detaches at
// the end of the test, checking that detach works.
func Attach(tb testing.TB, pod *testpod.Pod, opts loader.Options, cfg *policy.Config) *Attached {
	tb.Helper()
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	_, statErr := os.Stat(loader.PinDir(opts, pod.Name))
	if err := loader.Attach(context.Background(), lp, cfg, opts); err != nil {
		tb.Fatalf("attach %s: %v", pod.Name, err)
	}
	if errors.Is(statErr, os.ErrNotExist) {
		tb.Cleanup(func() {
			if err := loader.Detach(pod.Name, opts); err != nil {
				tb.Errorf("detach %s: %v", pod.Name, err)
			}
		})
	}
	return &Attached{Pod: pod, Opts: opts}
}

// Counters reads the pod's verdict counters.
func (a *Attached) Counters(tb testing.TB) map[policy.Reason]uint64 {
	tb.Helper()
	m, err := loader.OpenMaps(a.Pod.Name, a.Opts)
	if err != nil {
		tb.Fatal(err)
	}
	defer loader.CloseMaps(m)
	c, err := maps.Counters(m)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// CountersByFamily reads the pod's verdict counters of one address family.
func (a *Attached) CountersByFamily(tb testing.TB, f maps.Family) map[policy.Reason]uint64 {
	tb.Helper()
	return a.counts(tb)[f]
}

// Drops reads what the pod's programs gave up on, by kind.
func (a *Attached) Drops(tb testing.TB) map[maps.Drop]uint64 {
	tb.Helper()
	m, err := loader.OpenMaps(a.Pod.Name, a.Opts)
	if err != nil {
		tb.Fatal(err)
	}
	defer loader.CloseMaps(m)
	d, err := maps.Drops(m)
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

// NoDrops fails the test if the pod's programs gave up on anything.
func (a *Attached) NoDrops(tb testing.TB) {
	tb.Helper()
	for d, n := range a.Drops(tb) {
		if n != 0 {
			tb.Errorf("drop %s counted %d times, want 0", d, n)
		}
	}
}

// AttachedPrograms counts divert's kinds of programs attached to the pod: on its cgroup,
// and sk_lookup on its network namespace (connect6 is not counted, see allPrograms).
func AttachedPrograms(tb testing.TB, pod *testpod.Pod) int {
	tb.Helper()
	return attachedPrograms(tb, pod, ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt)
}

// allPrograms counts every kind divert attaches, connect6 included (AttachedPrograms
// predates it and its callers count four).
func allPrograms(tb testing.TB, pod *testpod.Pod) int {
	tb.Helper()
	return attachedPrograms(tb, pod, ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt)
}

func attachedPrograms(tb testing.TB, pod *testpod.Pod, cgroupTypes ...ebpf.AttachType) int {
	tb.Helper()
	n := 0
	query := func(path string, types ...ebpf.AttachType) {
		f, err := os.Open(path)
		if err != nil {
			tb.Fatal(err)
		}
		defer f.Close()
		for _, at := range types {
			res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
			if err != nil {
				tb.Fatalf("query %s programs on %s: %v", at, path, err)
			}
			n += len(res.Programs)
		}
	}
	query(pod.CgroupPath, cgroupTypes...)
	query(pod.NetNSPath, ebpf.AttachSkLookup)
	return n
}

// AssertNothingAttached checks that the pod has no programs and the bpffs no pins (nor
// fallback markers).
func AssertNothingAttached(tb testing.TB, pod *testpod.Pod, opts loader.Options) {
	tb.Helper()
	if n := allPrograms(tb, pod); n != 0 {
		tb.Errorf("%d programs still attached to pod %s", n, pod.Name)
	}
	for _, d := range []string{"divert", "divert_staging", "divert_fallback"} {
		entries, err := os.ReadDir(filepath.Join(opts.BPFFS, d))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			tb.Fatal(err)
		}
		if len(entries) != 0 {
			tb.Errorf("%s/%s still holds %v", opts.BPFFS, d, entries)
		}
	}
}

// Cgroup2Mount finds the cgroup v2 mount (/sys/fs/cgroup/unified on a hybrid host).
func Cgroup2Mount(tb testing.TB) string {
	tb.Helper()
	m, err := cgroups.Mountpoint()
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

// ChildCgroup creates dir/name (a container's cgroup in a test pod) and removes it at the
// end of the test, after the cleanups registered later (detaching, stopping processes).
func ChildCgroup(tb testing.TB, dir, name string) string {
	tb.Helper()
	p := filepath.Join(dir, name)
	if err := os.Mkdir(p, 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		var err error
		for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if err = unix.Rmdir(p); err != unix.EBUSY || time.Now().After(deadline) {
				break
			}
		}
		if err != nil && err != unix.ENOENT {
			tb.Errorf("rmdir %s: %v", p, err)
		}
	})
	return p
}

// HoldLinks opens every link pinned for the pod, as a concurrent reader of the pins
// (`divert status`, a second agent) holds them, and keeps them open until the returned
// function is called (at the latest, at the end of the test). A link that is only unpinned
// while someone holds it stays attached: with these references held, Detach must detach
// each link itself. The returned function checks that every held link is detached (the
// kernel reports no cgroup or network namespace for it) and closes them.
func HoldLinks(tb testing.TB, opts loader.Options, id string) (checkDetached func()) {
	tb.Helper()
	dir := loader.PinDir(opts, id)
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	held := map[string]link.Link{}
	release := func() {
		for _, l := range held {
			l.Close()
		}
		clear(held)
	}
	tb.Cleanup(release)
	for _, e := range entries {
		if e.Type()&os.ModeSymlink != 0 {
			continue // the pod's name and slot
		}
		pin := filepath.Join(dir, e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			m, mapErr := ebpf.LoadPinnedMap(pin, nil)
			if mapErr != nil {
				tb.Fatalf("pin %s is neither a link (%v) nor a map (%v)", pin, err, mapErr)
			}
			m.Close()
			continue
		}
		held[e.Name()] = l
	}
	if len(held) == 0 {
		tb.Fatalf("no links pinned in %s: nothing to hold", dir)
	}
	return func() {
		tb.Helper()
		defer release()
		for name, l := range held {
			info, err := l.Info()
			if err != nil {
				tb.Errorf("held link %s: %v", name, err)
				continue
			}
			if cg := info.Cgroup(); cg != nil && cg.CgroupId != 0 {
				tb.Errorf("held link %s (program %d) still attached to cgroup %d after detach", name, info.Program, cg.CgroupId)
			}
			if ns := info.NetNs(); ns != nil && ns.NetnsInode != 0 {
				tb.Errorf("held link %s (program %d) still attached to netns %d after detach", name, info.Program, ns.NetnsInode)
			}
		}
	}
}
