package loader_test

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/test/testutil"
)

// TestPrototypeSlotFromCgroupStorage is issue 24's prototype of how one program, loaded
// once, finds the pod it runs for: the same connect4 and sockops programs attached to two
// pods' cgroups read each pod's slot from cgroup storage keyed by the cgroup id alone,
// written after attach, and a process in each pod's cgroup is counted under its own pod's
// slot by both hooks (one storage shared by the attach types on a cgroup).
func TestPrototypeSlotFromCgroupStorage(t *testing.T) {
	testutil.RequirePrivileged(t)
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	spec, err := ebpf.LoadCollectionSpec("testdata/nodeproto/slot.o")
	if err != nil {
		t.Fatal(err)
	}
	var objs struct {
		Connect4 *ebpf.Program `ebpf:"slot_connect4"`
		Sockops  *ebpf.Program `ebpf:"slot_sockops"`
		PodSlot  *ebpf.Map     `ebpf:"pod_slot"`
		Seen     *ebpf.Map     `ebpf:"seen"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	defer objs.Connect4.Close()
	defer objs.Sockops.Close()
	defer objs.PodSlot.Close()
	defer objs.Seen.Close()

	root, err := cgroups.Mountpoint()
	if err != nil {
		t.Fatal(err)
	}
	var cgs []string
	for i, slot := range []uint32{1, 2} {
		dir := filepath.Join(root, "divert-test", "nodeproto-"+t.Name()+string(rune('a'+i)))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(dir) })
		for _, p := range []struct {
			prog *ebpf.Program
			at   ebpf.AttachType
		}{{objs.Connect4, ebpf.AttachCGroupInet4Connect}, {objs.Sockops, ebpf.AttachCGroupSockOps}} {
			l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: p.at, Program: p.prog})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}
		var st unix.Stat_t
		if err := unix.Stat(dir, &st); err != nil {
			t.Fatal(err)
		}
		if err := objs.PodSlot.Update(st.Ino, slot, ebpf.UpdateExist); err != nil {
			t.Fatalf("write pod %d's slot: %v", slot, err)
		}
		cgs = append(cgs, dir)
	}
	for _, dir := range cgs {
		fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil {
			t.Fatal(err)
		}
		out, err := connectFromCgroup(fd)
		unix.Close(fd)
		if err != nil {
			t.Fatalf("connect from %s: %v %s", dir, err, out)
		}
	}
	for slot := uint32(0); slot < 3; slot++ {
		for hook, name := range []string{"connect4", "sockops"} {
			var n uint64
			key := slot*2 + uint32(hook)
			if err := objs.Seen.Lookup(key, &n); err != nil {
				t.Fatal(err)
			}
			want := uint64(1)
			if slot == 0 {
				want = 0 // no run without a slot
			}
			if n != want {
				t.Errorf("slot %d, %s: %d runs, want %d", slot, name, n, want)
			}
		}
	}
}

// TestPrototypeSlotSurvivesLinkUpdate is the upgrade of issue 24's design: a second load of
// the programs (a new build) that shares the first one's cgroup storage map replaces the
// running programs with link.Update, and the pod's slot, written once under the first
// build, is still what the new programs read: the kernel allocates cgroup storage at attach
// and keeps it across a program replacement, keyed by the map.
func TestPrototypeSlotSurvivesLinkUpdate(t *testing.T) {
	testutil.RequirePrivileged(t)
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	type build struct {
		Connect4 *ebpf.Program `ebpf:"slot_connect4"`
		Sockops  *ebpf.Program `ebpf:"slot_sockops"`
		PodSlot  *ebpf.Map     `ebpf:"pod_slot"`
		Seen     *ebpf.Map     `ebpf:"seen"`
	}
	load := func(replace *build) *build {
		spec, err := ebpf.LoadCollectionSpec("testdata/nodeproto/slot.o")
		if err != nil {
			t.Fatal(err)
		}
		var opts ebpf.CollectionOptions
		if replace != nil {
			opts.MapReplacements = map[string]*ebpf.Map{"pod_slot": replace.PodSlot, "seen": replace.Seen}
		}
		var b build
		if err := spec.LoadAndAssign(&b, &opts); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Connect4.Close(); b.Sockops.Close(); b.PodSlot.Close(); b.Seen.Close() })
		return &b
	}
	old := load(nil)
	root, err := cgroups.Mountpoint()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "divert-test", "nodeproto-"+t.Name())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	var links []link.Link
	for _, p := range []struct {
		prog *ebpf.Program
		at   ebpf.AttachType
	}{{old.Connect4, ebpf.AttachCGroupInet4Connect}, {old.Sockops, ebpf.AttachCGroupSockOps}} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: p.at, Program: p.prog})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		links = append(links, l)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	const slot = 3
	if err := old.PodSlot.Update(st.Ino, uint32(slot), ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}
	connect := func() {
		fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if out, err := connectFromCgroup(fd); err != nil {
			t.Fatalf("connect: %v %s", err, out)
		}
	}
	runs := func(s uint32) (c, so uint64) {
		if err := old.Seen.Lookup(s*2, &c); err != nil {
			t.Fatal(err)
		}
		if err := old.Seen.Lookup(s*2+1, &so); err != nil {
			t.Fatal(err)
		}
		return c, so
	}
	connect()
	if c, so := runs(slot); c != 1 || so != 1 {
		t.Fatalf("first build: slot %d counted %d connect4 and %d sockops runs, want 1 and 1", slot, c, so)
	}

	next := load(old)
	for i, prog := range []*ebpf.Program{next.Connect4, next.Sockops} {
		if err := links[i].Update(prog); err != nil {
			t.Fatalf("link.Update to the second build: %v", err)
		}
		info, err := links[i].Info()
		if err != nil {
			t.Fatal(err)
		}
		pinfo, err := prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		if id, _ := pinfo.ID(); info.Program != id {
			t.Fatalf("link %d runs program %d after the update, want the second build's %d", i, info.Program, id)
		}
	}
	connect()
	if c, so := runs(slot); c != 2 || so != 2 {
		t.Errorf("after link.Update: slot %d counted %d connect4 and %d sockops runs, want 2 and 2 (the new programs lost the slot)", slot, c, so)
	}
	if c, so := runs(0); c != 0 || so != 0 {
		t.Errorf("after link.Update: %d connect4 and %d sockops runs found no slot", c, so)
	}
}

const connectChild = "DIVERT_TEST_CONNECT_CHILD"

// connectFromCgroup runs this test binary in the cgroup (fd) to connect once to
// 127.0.0.1:9 (refused or not, the connect hooks run): the VM guests have no shell.
func connectFromCgroup(cgroupFD int) ([]byte, error) {
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), connectChild+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgroupFD}
	return cmd.CombinedOutput()
}

// runConnectChildIfRequested is connectFromCgroup's child.
func runConnectChildIfRequested() {
	if os.Getenv(connectChild) != "1" {
		return
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:9", time.Second); err == nil {
		c.Close()
	}
	os.Exit(0)
}
