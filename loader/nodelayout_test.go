package loader_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// podWithProxy is a pod with an app on :8080 and a proxy (name) on 15001 and 15006.
func podWithProxy(t testing.TB, net *testpod.Network, app, proxy string) *testpod.Pod {
	p := net.AddPod(t)
	any := netip.IPv4Unspecified()
	p.Server(t, app, netip.AddrPortFrom(any, 8080), divertest.AppUID, divertest.AppUID)
	p.StartProxy(t, testpod.ProxyConfig{Name: proxy, Mode: "report", UID: divertest.ProxyUID, GID: divertest.ProxyUID,
		Listen: []netip.AddrPort{netip.AddrPortFrom(any, 15001), netip.AddrPortFrom(any, 15006)}})
	return p
}

func landed(t *testing.T, what string, r testpod.Result, want string) {
	t.Helper()
	if len(r.Hops) != 1 || r.Hops[0].Who != want {
		t.Errorf("%s: landed %+v, want %s", what, r, want)
	}
}

// Two pods attached through the same node programs each get their own policy: one
// excludes outbound port 80 and inbound port 8080, which the other captures; the cgroup
// programs are the same programs (ids) on both, sk_lookup is each pod's own.
func TestPodsShareNodePrograms(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	a := podWithProxy(t, net, "app-a", "proxy-a")
	b := podWithProxy(t, net, "app-b", "proxy-b")
	divertest.Attach(t, a, opts, divertest.Config(t))
	divertest.Attach(t, b, opts, divertest.Config(t, "-o", "80", "-d", "8080"))

	remote := testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], 80)}
	landed(t, "pod a outbound", a.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-a")
	landed(t, "pod b outbound", b.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "remote")
	landed(t, "pod a inbound", net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(a.Addr, 8080)})[0], "proxy-a")
	landed(t, "pod b inbound", net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(b.Addr, 8080)})[0], "app-b")

	sa, err := loader.Status(a.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := loader.Status(b.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	node, err := loader.NodeProgramIDs(opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(sa.Programs) != 11 || len(sb.Programs) != 11 {
		t.Fatalf("programs attached: %d and %d, want 11 each", len(sa.Programs), len(sb.Programs))
	}
	for i, pa := range sa.Programs {
		pb := sb.Programs[i]
		shared := pa.Name != "divert_sk_lookup"
		if got := pa.ProgramID == pb.ProgramID; got != shared {
			t.Errorf("%s: program %d on pod a, %d on pod b; want shared=%v", pa.Name, pa.ProgramID, pb.ProgramID, shared)
		}
		if shared && pa.ProgramID != node[pa.Name] {
			t.Errorf("%s: pods run program %d, the node's is %d", pa.Name, pa.ProgramID, node[pa.Name])
		}
	}
	// Each pod's verdicts are counted in its own maps.
	if sa.Counters["excluded-outbound-port"] != 0 || sb.Counters["excluded-outbound-port"] != 1 {
		t.Errorf("excluded-outbound-port counted %d on pod a and %d on pod b, want 0 and 1", sa.Counters["excluded-outbound-port"], sb.Counters["excluded-outbound-port"])
	}
	if *sa.Listeners == 0 || *sb.Listeners == 0 {
		t.Errorf("listeners: %d on pod a, %d on pod b; want each pod's proxy", *sa.Listeners, *sb.Listeners)
	}
}

// A pod attached by the per-pod layout (an earlier divert: its own programs, none of them
// using cgroup storage) keeps capturing after this build attaches another pod with the
// node's programs; an update rewrites its maps in place and keeps its programs (they must
// never be swapped for programs that read a slot its cgroup has no storage for); status
// and detach work on it.
func TestPerPodLayoutKeepsWorking(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	old := podWithProxy(t, net, "app-old", "proxy-old")
	fresh := podWithProxy(t, net, "app-new", "proxy-new")
	lp := loader.Pod{ID: old.Name, Cgroup: old.CgroupPath, NetNS: old.NetNSPath}
	if err := loader.AttachPerPodLayout(lp, divertest.Config(t), opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(old.Name, opts) })
	divertest.Attach(t, fresh, opts, divertest.Config(t))

	remote := testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], 80)}
	landed(t, "old pod outbound", old.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-old")
	landed(t, "old pod inbound", net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(old.Addr, 8080)})[0], "proxy-old")
	landed(t, "new pod outbound", fresh.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-new")

	before, err := loader.Status(old.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	node, err := loader.NodeProgramIDs(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := loader.Attach(context.Background(), lp, divertest.Config(t, "-o", "80"), opts); err != nil {
		t.Fatalf("update the old pod: %v", err)
	}
	after, err := loader.Status(old.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range after.Programs {
		if p.ProgramID != before.Programs[i].ProgramID || p.LinkID != before.Programs[i].LinkID {
			t.Errorf("%s: program %d link %d became program %d link %d; the old pod's must stay", p.Name,
				before.Programs[i].ProgramID, before.Programs[i].LinkID, p.ProgramID, p.LinkID)
		}
		if p.ProgramID == node[p.Name] {
			t.Errorf("%s: the old pod runs the node's program %d", p.Name, p.ProgramID)
		}
	}
	if got := after.Policy.OutboundExcludePorts; len(got) != 1 || got[0] != 80 {
		t.Errorf("old pod's status reads -o %v, want [80]", got)
	}
	if after.Health != "healthy" {
		t.Errorf("old pod's health: %s", after.Health)
	}
	landed(t, "old pod outbound after its update", old.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "remote")
	landed(t, "new pod outbound", fresh.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-new")

	if err := loader.Detach(old.Name, opts); err != nil {
		t.Fatal(err)
	}
	if n := divertest.AttachedPrograms(t, old); n != 0 {
		t.Errorf("%d programs left on the detached old pod", n)
	}
	landed(t, "new pod outbound after the old pod's detach", fresh.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-new")
}

// gc keeps a build's programs while a pod runs them and removes them once an upgrade
// swapped every pod to another build; this build's stay (the next attach uses them).
func TestGCRemovesUnusedBuilds(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	p := podWithProxy(t, net, "app", "proxy")
	defer loader.SetBuildTag("")
	builds := func() []string {
		t.Helper()
		entries, err := os.ReadDir(filepath.Join(opts.BPFFS, "divert_node", "programs"))
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range entries {
			out = append(out, e.Name())
		}
		return out
	}
	gc := func() {
		t.Helper()
		if _, err := loader.GC(opts); err != nil {
			t.Fatal(err)
		}
	}
	loader.SetBuildTag("old-build")
	divertest.Attach(t, p, opts, divertest.Config(t))
	loader.SetBuildTag("")
	if err := loader.Probe(opts); err != nil { // this build's programs, loaded before any pod runs them
		t.Fatal(err)
	}
	gc()
	if got := builds(); !slices.Contains(got, "old-build") || len(got) != 2 {
		t.Fatalf("builds after gc with a pod on old-build: %v, want old-build and this build's", got)
	}
	divertest.Attach(t, p, opts, divertest.Config(t)) // the upgrade: swapped to this build
	remote := testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], 80)}
	landed(t, "after the upgrade", p.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy")
	gc()
	if got := builds(); slices.Contains(got, "old-build") || len(got) != 1 {
		t.Fatalf("builds after gc with every pod upgraded: %v, want only this build's", got)
	}
	landed(t, "after gc", p.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy")
}

// A detached pod's slot keeps its maps for the next pod, which reuses them with its own
// policy and zeroed counters; gc gives back the maps of the slots no pod holds.
func TestSlotReuseAndGC(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	remote := testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], 80)}
	a := podWithProxy(t, net, "app-a", "proxy-a")
	lp := loader.Pod{ID: a.Name, Cgroup: a.CgroupPath, NetNS: a.NetNSPath}
	if err := loader.Attach(context.Background(), lp, divertest.Config(t, "-o", "80"), opts); err != nil {
		t.Fatal(err)
	}
	landed(t, "pod a", a.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "remote")
	aLookup := skLookupID(t, a.Name, opts)
	if err := loader.Detach(a.Name, opts); err != nil {
		t.Fatal(err)
	}
	filled, err := loader.FilledSlots(opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(filled) == 0 || len(filled) > 8 {
		t.Fatalf("slots filled after the first attach and its detach: %v, want one chunk kept", filled)
	}
	b := podWithProxy(t, net, "app-b", "proxy-b")
	st := divertest.Attach(t, b, opts, divertest.Config(t))
	landed(t, "pod b in pod a's slot", b.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-b")
	// The slot's sk_lookup (its slot a constant) is kept for the next pod with its maps:
	// no load, no verifier; and it finds pod b's own proxy.
	if got := skLookupID(t, b.Name, opts); got != aLookup {
		t.Errorf("pod b's sk_lookup is program %d, want pod a's slot's %d reused", got, aLookup)
	}
	landed(t, "pod b inbound in pod a's slot", net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(b.Addr, 8080)})[0], "proxy-b")
	if got := st.Counters(t); got[policy.ReasonExcludedOutboundPort] != 0 || got[policy.ReasonIncludedCIDR] != 1 {
		t.Errorf("pod b's counters %v: want its one captured connection only, none of pod a's", got)
	}
	if again, _ := loader.FilledSlots(opts); !slices.Equal(again, filled) {
		t.Errorf("slots filled %v after pod b's attach, want %v reused", again, filled)
	}
	if _, err := loader.GC(opts); err != nil {
		t.Fatal(err)
	}
	if got, _ := loader.FilledSlots(opts); len(got) != 1 {
		t.Errorf("slots filled after gc: %v, want pod b's alone", got)
	}
	landed(t, "pod b after gc", b.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-b")
}

// A slot's owner_gids starts small (its buckets cost memory even empty); a policy that
// lists more groups gets a full-size one swapped in, at attach and at update, and the
// groups it lists are the ones the programs match: the app's group is excluded.
func TestOwnerGidsGrow(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	remote := testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], 80)}
	a := podWithProxy(t, net, "app-a", "proxy-a")
	b := podWithProxy(t, net, "app-b", "proxy-b")
	groups := func(n int, last uint32) string {
		var gs []string
		for i := range n - 1 {
			gs = append(gs, strconv.Itoa(20000+i))
		}
		return strings.Join(append(gs, strconv.FormatUint(uint64(last), 10)), ",")
	}
	first := divertest.Config(t, "--istio-outbound-owner-groups-exclude", groups(20, divertest.AppUID))
	if err := loader.CheckPolicy(first); errors.Is(err, ebpf.ErrNotSupported) {
		// Before Linux 6.2 (the 5.10 and 6.1 guests) attach refuses owner groups, so no
		// policy here lists a group and owner_gids never grows.
		t.Logf("owner groups are refused on this kernel (%v): nothing to grow", err)
		return
	}
	divertest.Attach(t, a, opts, first)
	landed(t, "pod a, its app's group excluded among 20 at attach", a.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "remote")
	divertest.Attach(t, b, opts, divertest.Config(t))
	landed(t, "pod b", b.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-b")
	divertest.Attach(t, b, opts, divertest.Config(t, "--istio-outbound-owner-groups-exclude", groups(30, divertest.AppUID)))
	landed(t, "pod b, its app's group excluded among 30 at update", b.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "remote")
	divertest.Attach(t, b, opts, divertest.Config(t, "--istio-outbound-owner-groups-exclude", groups(30, 4242)))
	landed(t, "pod b, another 30 groups", b.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-b")
	st, err := loader.Status(b.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	if st.Health != "healthy" {
		t.Errorf("pod b: %s", st.Health)
	}
}

// skLookupID is the program pod id's sk_lookup link runs.
func skLookupID(t *testing.T, id string, opts loader.Options) uint32 {
	t.Helper()
	st, err := loader.Status(id, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Programs {
		if p.Attach == ebpf.AttachSkLookup.String() {
			return p.ProgramID
		}
	}
	t.Fatalf("pod %s has no sk_lookup link: %+v", id, st.Programs)
	return 0
}

// A node's maps keep the slot count they were made with (the first node layout made 512
// slots, this build makes 1,024): this build's programs load onto them as they are, and the
// node is full at their count, refusing one more pod with nothing of it left behind.
func TestNodeKeepsItsSlotCount(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	if err := loader.MakeNodeMaps(opts, 3); err != nil { // slots 1 and 2
		t.Fatal(err)
	}
	net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	remote := testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], 80)}
	a := podWithProxy(t, net, "app-a", "proxy-a")
	b := podWithProxy(t, net, "app-b", "proxy-b")
	c := podWithProxy(t, net, "app-c", "proxy-c")
	la := loader.Pod{ID: a.Name, Cgroup: a.CgroupPath, NetNS: a.NetNSPath} // detached below
	if err := loader.Attach(context.Background(), la, divertest.Config(t), opts); err != nil {
		t.Fatal(err)
	}
	divertest.Attach(t, b, opts, divertest.Config(t))
	landed(t, "pod a outbound", a.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-a")
	landed(t, "pod b inbound", net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(b.Addr, 8080)})[0], "proxy-b")

	lc := loader.Pod{ID: c.Name, Cgroup: c.CgroupPath, NetNS: c.NetNSPath}
	err := loader.Attach(context.Background(), lc, divertest.Config(t), opts)
	if err == nil || !strings.Contains(err.Error(), "no free pod slot: 2 pods are attached") {
		t.Fatalf("attach of a third pod on a node of 2 slots: %v, want no free pod slot", err)
	}
	if _, err := loader.Status(c.Name, opts); !errors.Is(err, loader.ErrNotAttached) {
		t.Errorf("pod c after its refused attach: %v, want not attached", err)
	}
	landed(t, "pod c outbound, refused", c.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "remote")

	if err := loader.Detach(a.Name, opts); err != nil {
		t.Fatal(err)
	}
	divertest.Attach(t, c, opts, divertest.Config(t))
	landed(t, "pod c in pod a's slot", c.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-c")
	landed(t, "pod c inbound", net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(c.Addr, 8080)})[0], "proxy-c")
}

// The slot index (<bpffs>/divert_node/slots/) names every attached pod with its slot; an
// index that does not (a pod attached by a build without it, a leftover of a killed detach)
// is made again from the pods' own slot pins, so no pod is ever given a taken slot.
func TestSlotIndex(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), 80))
	index := filepath.Join(opts.BPFFS, "divert_node", "slots")
	names := func() []string {
		t.Helper()
		entries, err := os.ReadDir(index)
		if err != nil {
			t.Fatal(err)
		}
		var ns []string
		for _, e := range entries {
			ns = append(ns, e.Name())
		}
		slices.Sort(ns)
		return ns
	}
	slotOf := func(p *testpod.Pod) string {
		t.Helper()
		s, err := os.Readlink(filepath.Join(loader.PinDir(opts, p.Name), "slot"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	pods := make([]*testpod.Pod, 4)
	for i := range pods {
		pods[i] = podWithProxy(t, net, "app-"+strconv.Itoa(i), "proxy-"+strconv.Itoa(i))
	}
	a, b, c, d := pods[0], pods[1], pods[2], pods[3]
	divertest.Attach(t, a, opts, divertest.Config(t))
	divertest.Attach(t, b, opts, divertest.Config(t))
	if got, want := names(), []string{"1-" + a.Name, "2-" + b.Name}; !slices.Equal(got, want) {
		t.Fatalf("index %v, want %v", got, want)
	}
	// Pod b as a build without the index would have left it: not named.
	if err := os.Remove(filepath.Join(index, "2-"+b.Name)); err != nil {
		t.Fatal(err)
	}
	divertest.Attach(t, c, opts, divertest.Config(t))
	if got := slotOf(c); got != "3" {
		t.Errorf("pod c got slot %s with pod b unindexed, want 3 (1 and 2 are taken)", got)
	}
	// A leftover entry of a pod that is gone, on a free slot.
	if err := os.Symlink("gone", filepath.Join(index, "4-gone")); err != nil {
		t.Fatal(err)
	}
	divertest.Attach(t, d, opts, divertest.Config(t))
	if got := slotOf(d); got != "4" {
		t.Errorf("pod d got slot %s beside a leftover entry for slot 4, want 4 (free)", got)
	}
	want := []string{"1-" + a.Name, "2-" + b.Name, "3-" + c.Name, "4-" + d.Name}
	if got := names(); !slices.Equal(got, want) {
		t.Errorf("index %v, want %v made again", got, want)
	}
	remote := testpod.Target{Dst: netip.AddrPortFrom(net.Addrs[0], 80)}
	for i, p := range pods {
		landed(t, "pod "+strconv.Itoa(i)+" outbound", p.Dial(t, divertest.AppUID, divertest.AppUID, remote)[0], "proxy-"+strconv.Itoa(i))
	}
}
