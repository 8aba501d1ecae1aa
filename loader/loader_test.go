package loader_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested()
	runCrashChildIfRequested()
	runConnectChildIfRequested()
	runNewSlotChildIfRequested()
	os.Exit(m.Run())
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
		if n := divertest.AttachedPrograms(t, pod); n != 4 {
			t.Errorf("before commit: %d programs attached, want 4", n)
		}
		return injected
	})
	defer loader.SetTestHookBeforeCommit(nil)

	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	if err := loader.Attach(context.Background(), lp, divertest.Config(t), opts); !errors.Is(err, injected) {
		t.Fatalf("attach returned %v, want the injected failure", err)
	}
	divertest.AssertNothingAttached(t, pod, opts)
	res := pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[0], 80)})[0]
	if len(res.Hops) != 1 || res.Hops[0].Who != "remote" {
		t.Fatalf("after a failed attach traffic must not be captured: %+v", res)
	}
}

// Detach removes everything and is idempotent, also while another process holds the
// links; attach after detach works again.
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
		// A concurrent reader holds the links: Detach must detach them, not only unpin.
		checkDetached := divertest.HoldLinks(t, opts, pod.Name)
		if err := loader.Detach(pod.Name, opts); err != nil {
			t.Fatal(err)
		}
		divertest.AssertNothingAttached(t, pod, opts)
		checkDetached()
		if err := loader.Detach(pod.Name, opts); !errors.Is(err, loader.ErrNotAttached) {
			t.Fatalf("second detach: %v, want ErrNotAttached", err)
		}
		divertest.AssertNothingAttached(t, pod, opts)
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

// A re-attach swaps programs only when this build's differ from the running ones: with the
// same programs it only rewrites the maps (programs, links and their ids stay); with other
// ones (a newer divert, or a process that has not loaded them yet) every program is swapped
// in place by link.Update and the links stay.
func TestReattachSwapsOnlyOtherPrograms(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	pod.Net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	pod.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
	dst := testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[0], 80)}
	defer loader.SetBuildTag("")

	divertest.Attach(t, pod, opts, divertest.Config(t))
	status := func() *loader.PodStatus {
		t.Helper()
		st, err := loader.Status(pod.Name, opts)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	first := status()
	step := func(name string, cfg *policy.Config, swapped bool, want string) {
		t.Helper()
		before := status()
		divertest.Attach(t, pod, opts, cfg)
		after := status()
		for i, p := range after.Programs {
			if p.LinkID != first.Programs[i].LinkID {
				t.Errorf("%s: %s link %d replaced by %d", name, p.Name, first.Programs[i].LinkID, p.LinkID)
			}
			// sk_lookup is swapped for other code only (its tag): the "other build" here
			// is this build's code under another tag.
			want := swapped && p.Name != "divert_sk_lookup"
			if got := p.ProgramID != before.Programs[i].ProgramID; got != want {
				t.Errorf("%s: %s program %d -> %d, want swapped=%v", name, p.Name, before.Programs[i].ProgramID, p.ProgramID, want)
			}
		}
		if r := pod.Dial(t, divertest.AppUID, divertest.AppUID, dst)[0]; len(r.Hops) != 1 || r.Hops[0].Who != want {
			t.Errorf("%s: connection landed %+v, want %s", name, r, want)
		}
	}
	step("same programs, new config", divertest.Config(t, "-o", "80"), false, "remote")
	// Another build: its programs loaded once beside this build's, on the node's maps, and
	// swapped in; the pod's slot (in cgroup storage) is still read: the connection lands.
	loader.SetBuildTag("other-build")
	step("upgrade to another build", divertest.Config(t), true, "proxy")
	step("the other build again", divertest.Config(t, "-o", "80"), false, "remote")
	loader.SetBuildTag("")
	step("back to this build", divertest.Config(t), true, "proxy")
	step("same programs again", divertest.Config(t), false, "proxy")
	divertest.Attach(t, pod.Net.AddPod(t), opts, divertest.Config(t))
	step("after another pod's attach", divertest.Config(t, "-o", "80"), false, "remote")
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

// A pod whose pins lack a map this build has (attached before DNS capture: no dns_servers)
// is refused as ErrIncompatible (the CLI adds the way out), not a raw "no such file".
func TestReattachMissingMapSaysIncompatible(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	divertest.Attach(t, pod, opts, divertest.Config(t))
	if err := os.Remove(filepath.Join(loader.PinDir(opts, pod.Name), "dns_servers")); err != nil {
		t.Fatal(err)
	}
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	err := loader.Attach(context.Background(), lp, divertest.Config(t, "--redirect-dns", "--capture-all-dns"), opts)
	if !errors.Is(err, loader.ErrIncompatible) || !strings.Contains(err.Error(), "pod "+pod.Name+": attached by an incompatible divert version") || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("re-attach over old pins: %v", err)
	}
}

// Directions can be turned off and on again by re-attaching; the link set follows.
func TestDirectionToggles(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	probe := divertest.NewCrashProbe(t, pod) // remote :80, app :8080, proxy :15001 and :15006
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })

	check := func(step string, noIn, noOut bool, programs int) {
		t.Helper()
		o := opts
		o.NoInbound, o.NoOutbound = noIn, noOut
		if err := loader.Attach(context.Background(), lp, divertest.Config(t), o); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if n := divertest.AttachedPrograms(t, pod); n != programs {
			t.Errorf("%s: %d programs attached, want %d", step, n, programs)
		}
		wantOut, wantIn := "proxy", "proxy"
		if noOut {
			wantOut = "remote"
		}
		if noIn {
			wantIn = "app"
		}
		probe.Landed(t, step, wantOut, wantIn)
	}
	check("outbound only", true, false, 3)
	check("both", false, false, 4)
	check("inbound only", false, true, 3)
	check("both again", false, false, 4)
	if err := loader.Attach(context.Background(), lp, divertest.Config(t), loader.Options{BPFFS: opts.BPFFS, NoInbound: true, NoOutbound: true}); err == nil {
		t.Error("attaching with both directions off must fail")
	}
}

// Large policies attach: 10,000 excluded ports and 10,000 excluded CIDRs (iptables takes
// them too), and a listed port and CIDR still pass while others are captured.
func TestLargePolicy(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	var ports, cidrs []string
	for i := range 10000 {
		ports = append(ports, strconv.Itoa(20000+i))
		cidrs = append(cidrs, fmt.Sprintf("10.%d.%d.0/24", i/256, i%256))
	}
	cfg := divertest.Config(t, "-o", strings.Join(ports, ","), "-x", strings.Join(cidrs, ",")+","+pod.Net.Addrs[1].String()+"/32")
	divertest.Attach(t, pod, opts, cfg)
	any := netip.IPv4Unspecified()
	pod.Net.Server(t, "remote", netip.AddrPortFrom(any, 80))
	pod.Net.Server(t, "remote", netip.AddrPortFrom(any, 29999))
	pod.Proxy(t, "proxy", netip.AddrPortFrom(any, 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
	for _, c := range []struct {
		dst  netip.AddrPort
		want string
	}{
		{netip.AddrPortFrom(pod.Net.Addrs[0], 29999), "remote"}, // excluded port
		{netip.AddrPortFrom(pod.Net.Addrs[1], 80), "remote"},    // excluded CIDR
		{netip.AddrPortFrom(pod.Net.Addrs[0], 80), "proxy"},     // neither
	} {
		if r := pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: c.dst})[0]; len(r.Hops) != 1 || r.Hops[0].Who != c.want {
			t.Errorf("%s: %+v, want %s", c.dst, r, c.want)
		}
	}
}

// The root of the cgroup hierarchy holds every process on the host: refused, nothing made.
func TestAttachRefusesCgroupRoot(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	root := divertest.Cgroup2Mount(t)
	lp := loader.Pod{ID: pod.Name, Cgroup: root, NetNS: pod.NetNSPath}
	err := loader.Attach(context.Background(), lp, divertest.Config(t), opts)
	if err == nil {
		loader.Detach(pod.Name, opts)
		t.Fatal("attach to the cgroup root succeeded")
	}
	var ie *loader.InputError
	if !errors.Is(err, loader.ErrCgroupRoot) || strings.Contains(err.Error(), "\n") || !errors.As(err, &ie) || ie.Field != "cgroup" || !strings.HasPrefix(err.Error(), "invalid cgroup ") {
		t.Errorf("want one line naming the cgroup that wraps ErrCgroupRoot, got %q", err)
	}
	divertest.AssertNothingAttached(t, pod, opts)
}

// One pod's programs per cgroup subtree and netns: a second pod id on the same cgroup, on a
// child or a parent of a captured cgroup, or on the same netns is refused naming the pod
// that holds it, and nothing of the second pod is left; the holder keeps capturing.
func TestAttachRefusesOverlap(t *testing.T) {
	holder := testpod.New(t)
	other := holder.Net.AddPod(t) // a network namespace nobody captures
	opts := divertest.BPFFS(t)
	holder.Net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	holder.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
	divertest.Attach(t, holder, opts, divertest.Config(t))
	child := divertest.ChildCgroup(t, holder.CgroupPath, "ctr")

	// A pod captured at a child cgroup, for the parent's turn.
	nested := holder.Net.AddPod(t)
	nestedChild := divertest.ChildCgroup(t, nested.CgroupPath, "ctr")
	if err := loader.Attach(context.Background(), loader.Pod{ID: nested.Name, Cgroup: nestedChild, NetNS: nested.NetNSPath}, divertest.Config(t), opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(nested.Name, opts) })

	for _, c := range []struct {
		name     string
		pod      loader.Pod
		holder   string
		relation string
	}{
		{"same cgroup", loader.Pod{ID: "second", Cgroup: holder.CgroupPath, NetNS: other.NetNSPath}, holder.Name, "cgroup"},
		{"child cgroup", loader.Pod{ID: "second", Cgroup: child, NetNS: other.NetNSPath}, holder.Name, "ancestor"},
		{"parent cgroup", loader.Pod{ID: "second", Cgroup: nested.CgroupPath, NetNS: other.NetNSPath}, nested.Name, "descendant"},
		{"same netns", loader.Pod{ID: "second", Cgroup: other.CgroupPath, NetNS: holder.NetNSPath}, holder.Name, "netns"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := loader.Attach(context.Background(), c.pod, divertest.Config(t), opts)
			if err == nil {
				loader.Detach(c.pod.ID, opts)
				t.Fatal("attach succeeded")
			}
			var ce *loader.CapturedError
			if !errors.As(err, &ce) || !errors.Is(err, loader.ErrCaptured) || ce.Holder != c.holder || ce.Relation != c.relation {
				t.Fatalf("want a CapturedError by %s (%s), got %#v: %v", c.holder, c.relation, ce, err)
			}
			if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "pod "+c.holder) {
				t.Errorf("error should be one line naming pod %s: %q", c.holder, msg)
			}
			if _, err := os.Stat(loader.PinDir(opts, "second")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("refused attach left pins: %v", err)
			}
			if n := divertest.AttachedPrograms(t, other); n != 0 {
				t.Errorf("refused attach left %d programs on the other pod", n)
			}
		})
	}
	// The holder is intact and a re-attach of its own id (an update) still works.
	divertest.Attach(t, holder, opts, divertest.Config(t, "-o", "3306"))
	dst := netip.AddrPortFrom(holder.Net.Addrs[0], 80)
	if r := holder.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: dst})[0]; len(r.Hops) != 1 || r.Hops[0].Who != "proxy" || r.Hops[0].Orig != dst.String() {
		t.Errorf("the holder lost capture: %+v", r)
	}
}

// An update to a prefix inside one the pod had (-x 10.0.0.0/8, then -x 10.96.0.0/12, and
// back) holds exactly the new one: an LPM trie's lookup of the new prefix finds the old
// one, which must not pass for "already there".
func TestReattachNestedCIDRs(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	for _, x := range []string{"10.0.0.0/8", "10.96.0.0/12", "10.0.0.0/8", "10.96.0.0/12,10.0.0.0/8", "10.96.0.0/12"} {
		cfg := divertest.Config(t, "-x", x, "-i", x+",192.168.0.0/16", "-q", "80")
		divertest.Attach(t, pod, opts, cfg)
		if err := divertest.CheckPolicy(opts, pod.Name, cfg); err != nil {
			t.Errorf("-x %s: %v", x, err)
		}
		st, err := loader.Status(pod.Name, opts)
		if err != nil {
			t.Fatal(err)
		}
		want := strings.Split(x+",192.168.0.0/16", ",")
		slices.Sort(want)
		if !slices.Equal(st.Policy.OutboundCIDRs, want) {
			t.Errorf("-i %s: kernel holds %v", x, st.Policy.OutboundCIDRs)
		}
	}
}

// Pins whose sk_lookup link the kernel detached with the pod's old network namespace (its
// sandbox was recreated) are replaced by Attach, for every caller, not refused as another
// pod's.
func TestAttachReplacesStalePins(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	// The old sandbox's netns, bind-mounted on a file of the test's own (not with `ip netns
	// add`, which re-binds /run/netns on itself the first time and so stacks every other
	// test's netns mounts below it).
	old := filepath.Join(t.TempDir(), "old-netns")
	if err := os.WriteFile(old, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread leaves the test's netns and dies with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- unix.Mount("/proc/thread-self/ns/net", old, "", unix.MS_BIND, "")
	}()
	if err := <-errc; err != nil {
		t.Fatalf("make the old netns: %v", err)
	}
	unmounted := false
	t.Cleanup(func() {
		if !unmounted {
			unix.Unmount(old, unix.MNT_DETACH)
		}
	})
	oldPod := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: old}
	if err := loader.Attach(context.Background(), oldPod, divertest.Config(t), opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	// The sandbox goes: its netns with it (nothing else holds it).
	if err := unix.Unmount(old, unix.MNT_DETACH); err != nil {
		t.Fatalf("remove the old netns: %v", err)
	}
	unmounted = true
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		gone, err := loader.Defunct(pod.Name, opts)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Equal(gone, []string{"divert_sk_lookup"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the old netns's sk_lookup link should be detached, defunct: %v", gone)
		}
	}
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	if err := loader.Attach(context.Background(), lp, divertest.Config(t), opts); err != nil {
		t.Fatalf("re-attach over stale pins: %v", err)
	}
	if gone, err := loader.Defunct(pod.Name, opts); err != nil || len(gone) != 0 {
		t.Fatalf("after re-attach: defunct %v, %v", gone, err)
	}
	if err := divertest.CheckAttachedOnce(pod, opts, pod.Name); err != nil {
		t.Fatal(err)
	}
}
