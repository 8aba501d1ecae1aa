package e2e

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// rootLBName names the test's root program, so a concurrent run of this test on the same
// host (the root cgroup is shared) is told apart from anything divert could attach there.
const rootLBName = "dvt_root_lb"

// cgroupHooks are every cgroup attach type divert's programs use.
var cgroupHooks = []ebpf.AttachType{
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
	ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg,
	ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg,
	ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername,
	ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt,
}

// rootLB is a program of the shape of Cilium's socket LB (kube-proxy replacement): a
// cgroup/connect4 program at the cgroup2 root that rewrites one VIP:port to a backend,
// counting each translation. Written with cilium/ebpf's asm so the test needs no compiled
// object.
type rootLB struct {
	root string // the cgroup2 mount: the root cgroup
	spec *ebpf.ProgramSpec
	prog *ebpf.Program
	hits *ebpf.Map
	lnk  link.Link
}

func newRootLB(tb testing.TB, vip, backend netip.AddrPort) *rootLB {
	tb.Helper()
	hits, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		tb.Fatalf("root LB map: %v", err)
	}
	tb.Cleanup(func() { hits.Close() })
	// bpf_sock_addr: user_ip4 at 4, user_port at 24, both in network byte order; read as
	// native-endian words they compare with the same bytes read the same way. The verifier
	// refuses immediate stores (BPF_ST) into the context: the rewrite goes through r2.
	word := func(b ...byte) int32 { return int32(binary.NativeEndian.Uint32(b)) }
	port := func(p uint16) int32 { return word(append(binary.BigEndian.AppendUint16(nil, p), 0, 0)...) }
	vip4, be4 := vip.Addr().As4(), backend.Addr().As4()
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, 4, asm.Word),
		asm.JNE.Imm32(asm.R2, word(vip4[:]...), "out"),
		asm.LoadMem(asm.R2, asm.R6, 24, asm.Word),
		asm.JNE.Imm32(asm.R2, port(vip.Port()), "out"),
		asm.Mov.Imm32(asm.R2, word(be4[:]...)),
		asm.StoreMem(asm.R6, 4, asm.R2, asm.Word),
		asm.Mov.Imm32(asm.R2, port(backend.Port())),
		asm.StoreMem(asm.R6, 24, asm.R2, asm.Word),
		asm.Mov.Imm(asm.R2, 0),
		asm.StoreMem(asm.RFP, -4, asm.R2, asm.Word),
		asm.LoadMapPtr(asm.R1, hits.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"), // 1: let the connect go on
		asm.Return(),
	}
	lb := &rootLB{root: divertest.Cgroup2Mount(tb), hits: hits, spec: &ebpf.ProgramSpec{
		Name: rootLBName, Type: ebpf.CGroupSockAddr, AttachType: ebpf.AttachCGroupInet4Connect,
		Instructions: insns, License: "GPL",
	}}
	lb.prog = lb.load(tb)
	tb.Cleanup(lb.detach)
	return lb
}

// load loads a new copy of the program (what a restarted agent swaps in).
func (lb *rootLB) load(tb testing.TB) *ebpf.Program {
	tb.Helper()
	prog, err := ebpf.NewProgram(lb.spec)
	if err != nil {
		tb.Fatalf("root LB program: %v", err)
	}
	tb.Cleanup(func() { prog.Close() })
	return prog
}

// attach links the program at the root, as Cilium does (a bpf_link: multi mode, and it
// goes away with this process if the test dies). flags 0 or BPF_F_PREORDER.
func (lb *rootLB) attach(flags uint32) error {
	f, err := os.Open(lb.root)
	if err != nil {
		return err
	}
	defer f.Close()
	lb.lnk, err = link.AttachRawLink(link.RawLinkOptions{
		Target: int(f.Fd()), Program: lb.prog, Attach: ebpf.AttachCGroupInet4Connect, Flags: flags,
	})
	return err
}

// detach breaks the link at once (BPF_LINK_DETACH: a close alone frees it later).
func (lb *rootLB) detach() {
	if lb.lnk == nil {
		return
	}
	if d, ok := lb.lnk.(interface{ Detach() error }); ok {
		_ = d.Detach()
	}
	lb.lnk.Close()
	lb.lnk = nil
}

func (lb *rootLB) translations(tb testing.TB) uint64 {
	tb.Helper()
	var n uint64
	if err := lb.hits.Lookup(uint32(0), &n); err != nil {
		tb.Fatal(err)
	}
	return n
}

// rootPrograms lists the programs attached at the root cgroup itself, by hook.
func rootPrograms(tb testing.TB, root string) map[ebpf.AttachType][]ebpf.ProgramID {
	tb.Helper()
	f, err := os.Open(root)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	got := map[ebpf.AttachType][]ebpf.ProgramID{}
	for _, at := range cgroupHooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			tb.Fatalf("query %s programs at the root cgroup %s: %v", at, root, err)
		}
		for _, p := range res.Programs {
			got[at] = append(got[at], p.ID)
		}
	}
	return got
}

// divertPrograms returns the programs of the pod's pinned links, each checked to be
// attached to the pod's own cgroup (or its netns), never an ancestor.
func divertPrograms(tb testing.TB, att *divertest.Attached) []ebpf.ProgramID {
	tb.Helper()
	var st unix.Stat_t
	if err := unix.Stat(att.Pod.CgroupPath, &st); err != nil {
		tb.Fatal(err)
	}
	dir := loader.PinDir(att.Opts, att.Pod.Name)
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	var ids []ebpf.ProgramID
	for _, e := range entries {
		l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			continue // a map or the pod_name entry
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			tb.Fatal(err)
		}
		ids = append(ids, info.Program)
		if cg := info.Cgroup(); cg != nil && cg.CgroupId != st.Ino {
			tb.Errorf("divert's link %s is attached to cgroup %d, not the pod's (%d)", e.Name(), cg.CgroupId, st.Ino)
		}
	}
	if len(ids) == 0 {
		tb.Fatalf("no links pinned in %s", dir)
	}
	return ids
}

// A Cilium-like socket LB at the root cgroup next to divert on a pod (issue 18 item 4).
// The kernel runs a cgroup's own programs before its ancestors' (docs/kernel-facts.md), so
// the app's dial to a VIP is captured by the pod's program with the VIP as original
// destination, and the proxy's own dial (uid 1337, passed by divert) is translated at the
// root. divert never attaches at the root, and a restart of the root program (detached and
// attached again, or a new program swapped into its link, as Cilium's agent does on
// upgrade) leaves the pod captured.
func TestRootCgroupLB(t *testing.T) {
	pod := testpod.New(t)
	// The VIP is in 198.18.255.0/24, which no test pod uses (pods are 198.18.1-254.x), and
	// the root program sees every connect on the host: a random last byte and port keep
	// even a concurrent run of this test elsewhere on the host out of the way.
	vip := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 255, byte(2 + rand.IntN(250))}), uint16(20000+rand.IntN(10000)))
	backend := netip.AddrPortFrom(testpod.PrimaryAddr, 8081)
	pod.Net.Server(t, "backend", backend)
	lb := newRootLB(t, vip, backend)
	if err := lb.attach(0); err != nil {
		t.Fatalf("attach the root LB at %s: %v", lb.root, err)
	}
	before := rootPrograms(t, lb.root)
	if !slices.ContainsFunc(before[ebpf.AttachCGroupInet4Connect], func(id ebpf.ProgramID) bool { return isRootLB(t, id) }) {
		t.Fatalf("the root LB is not listed at the root cgroup: %v", before)
	}
	att := divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	pod.Proxy(t, "proxy", netip.AddrPortFrom(anyAddr, 15001), "forward", proxyUID, proxyUID)

	t.Run("divert-not-at-root", func(t *testing.T) {
		after := rootPrograms(t, lb.root)
		ours := divertPrograms(t, att)
		t.Logf("root cgroup: %v; divert's programs: %v", after, ours)
		for at, ids := range after {
			for _, id := range ids {
				if slices.Contains(ours, id) {
					t.Errorf("divert's program %d is attached at the root cgroup (%s)", id, at)
				} else if !slices.Contains(before[at], id) && !isRootLB(t, id) {
					t.Errorf("program %d appeared at the root cgroup (%s) when divert attached", id, at)
				}
			}
		}
	})

	appToVIP := func(t *testing.T) {
		t.Helper()
		n := lb.translations(t)
		res := pod.Dial(t, appUID, appUID, testpod.Target{Dst: vip})[0]
		if res.Err != "" || len(res.Hops) != 2 {
			t.Fatalf("app -> VIP %s: want proxy then backend, got %+v", vip, res)
		}
		if h := res.Hops[0]; h.Who != "proxy" || h.Orig != vip.String() {
			t.Errorf("the proxy should have read the VIP %s as original destination: %+v", vip, h)
		}
		if h := res.Hops[1]; h.Who != "backend" || h.Local != backend.String() {
			t.Errorf("the backend %s should have answered the proxy's dial: %+v", backend, h)
		}
		// Once: the proxy's dial. The app's reached the root already rewritten to the proxy.
		if d := lb.translations(t) - n; d != 1 {
			t.Errorf("the root LB translated %d connects, want 1 (the proxy's)", d)
		}
	}

	t.Run("app-to-vip", func(t *testing.T) {
		before := att.Counters(t)
		appToVIP(t)
		after := att.Counters(t)
		if d := after[policy.ReasonIncludedCIDR] - before[policy.ReasonIncludedCIDR]; d != 1 {
			t.Errorf("divert redirected %d connects, want 1 (the app's)", d)
		}
		if d := after[policy.ReasonProxyUID] - before[policy.ReasonProxyUID]; d != 1 {
			t.Errorf("divert passed %d connects as the proxy's, want 1", d)
		}
	})

	t.Run("proxy-to-vip", func(t *testing.T) {
		n := lb.translations(t)
		res := pod.Dial(t, proxyUID, proxyUID, testpod.Target{Dst: vip})[0]
		if res.Err != "" || len(res.Hops) != 1 || res.Hops[0].Who != "backend" || res.Hops[0].Local != backend.String() {
			t.Fatalf("proxy uid -> VIP %s: want the backend %s directly, got %+v", vip, backend, res)
		}
		if d := lb.translations(t) - n; d != 1 {
			t.Errorf("the root LB translated %d connects, want 1", d)
		}
	})

	t.Run("root-lb-restarted", func(t *testing.T) {
		programs := divertest.AttachedPrograms(t, pod)
		lb.detach()
		// Capture does not depend on the root program: the app still reaches the proxy with
		// the VIP; only the proxy's upstream dial now goes nowhere.
		res := pod.Dial(t, appUID, appUID, testpod.Target{Dst: vip})[0]
		if len(res.Hops) != 1 || res.Hops[0].Who != "proxy" || res.Hops[0].Orig != vip.String() || res.Hops[0].Err == "" {
			t.Errorf("app -> VIP without the root LB: want the proxy (orig %s) failing upstream, got %+v", vip, res)
		}
		if err := lb.attach(0); err != nil {
			t.Fatalf("attach the root LB again: %v", err)
		}
		if n := divertest.AttachedPrograms(t, pod); n != programs {
			t.Errorf("divert's programs on the pod: %d before the root LB's restart, %d after", programs, n)
		}
		appToVIP(t)
		// Cilium's agent restarts by swapping a new program into its pinned link.
		if err := lb.lnk.Update(lb.load(t)); err != nil {
			t.Fatalf("update the root LB's link: %v", err)
		}
		appToVIP(t)
		att.NoDrops(t)
	})

	// BPF_F_PREORDER (Linux 6.15; on a bpf_link with the cgroup mprog API, 6.16) puts an
	// ancestor's program before its descendants': then the root translates the app's VIP
	// first and divert captures the backend's address, as iptables capture would under
	// Cilium's socket LB without socketLB.hostNamespaceOnly. No Cilium release asks for it.
	t.Run("preorder-root-runs-first", func(t *testing.T) {
		lb.detach()
		err := lb.attach(unix.BPF_F_PREORDER)
		if errors.Is(err, unix.EINVAL) {
			t.Logf("this kernel refuses BPF_F_PREORDER on a cgroup link (before 6.16): the pod's program always runs first")
			if err := lb.attach(0); err != nil {
				t.Fatal(err)
			}
			appToVIP(t)
			return
		}
		if err != nil {
			t.Fatalf("attach the root LB with BPF_F_PREORDER: %v", err)
		}
		n := lb.translations(t)
		res := pod.Dial(t, appUID, appUID, testpod.Target{Dst: vip})[0]
		if res.Err != "" || len(res.Hops) != 2 || res.Hops[0].Who != "proxy" || res.Hops[0].Orig != backend.String() || res.Hops[1].Who != "backend" {
			t.Errorf("app -> VIP with a preorder root LB: want the proxy (orig the backend %s) then the backend, got %+v", backend, res)
		}
		if d := lb.translations(t) - n; d != 1 {
			t.Errorf("the root LB translated %d connects, want 1 (the app's, before divert)", d)
		}
	})
}

// isRootLB says whether program id is this test's root program (or a concurrent run's).
func isRootLB(tb testing.TB, id ebpf.ProgramID) bool {
	tb.Helper()
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return false // gone meanwhile
	}
	defer p.Close()
	info, err := p.Info()
	return err == nil && info.Name == rootLBName
}
