// Package security checks what docs/security.md promises: a pod's pins are root's alone,
// and a process in a pod, even root in its own user namespace, cannot reach, detach or
// rewrite another pod's programs and maps.
package security

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested(testpod.Helpers{"attacker": runAttacker, "escape": runEscape})
	os.Exit(m.Run())
}

// TestPinDirModes: every directory divert makes in bpffs is 0700 (a looser one left by an
// older version is tightened) and every pin 0600, so only root opens them by path.
func TestPinDirModes(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	// A pins directory made by hand or an older version, open to all.
	if err := os.Mkdir(filepath.Join(opts.BPFFS, "divert"), 0o755); err != nil {
		t.Fatal(err)
	}
	divertest.Attach(t, pod, opts, divertest.Config(t))
	// A fallback marker of another pod, as an init container that fell back leaves it.
	if err := loader.RecordFallback("other-pod", "no sk_lookup", opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.ClearFallback("other-pod", opts) })

	podDir := loader.PinDir(opts, pod.Name)
	traceDir := filepath.Join(opts.BPFFS, "divert_trace") // the node's trace maps
	node := filepath.Join(opts.BPFFS, "divert_node")
	builds, err := os.ReadDir(filepath.Join(node, "programs"))
	if err != nil || len(builds) != 1 {
		t.Fatalf("node program builds %v, %v: want one", builds, err)
	}
	build := filepath.Join(node, "programs", builds[0].Name())
	for _, d := range []string{filepath.Dir(podDir), podDir, filepath.Join(opts.BPFFS, "divert_staging"), filepath.Join(opts.BPFFS, "divert_fallback"),
		traceDir, node, filepath.Join(node, "maps"), filepath.Join(node, "programs"), build} {
		assertMode(t, d, os.ModeDir|0o700)
	}
	for _, dir := range []string{podDir, traceDir, filepath.Join(node, "maps"), build} {
		pins, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(pins) == 0 {
			t.Fatalf("no pins in %s", dir)
		}
		for _, p := range pins {
			if p.Type()&os.ModeSymlink != 0 {
				continue // the pod's slot (and name): a number, no way to a kernel object
			}
			assertMode(t, filepath.Join(dir, p.Name()), 0o600)
		}
	}
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Mode() &^ (os.ModeSetgid | os.ModeSticky); got != want {
		t.Errorf("%s has mode %v, want %v", path, got, want)
	}
}

// victim is what the attacker is told about the pod it attacks.
type victim struct {
	PinDir   string   `json:"pinDir"`
	Pins     []string `json:"pins"`
	MapIDs   []uint32 `json:"mapIDs"`
	LinkIDs  []uint32 `json:"linkIDs"`
	ProgIDs  []uint32 `json:"progIDs"`
	Cgroup   string   `json:"cgroup"`
	CgroupFS string   `json:"cgroupFS"`
}

// attack is one thing the attacker tried and the error that stopped it ("" if it worked).
type attack struct {
	What string `json:"what"`
	Err  string `json:"err"`
}

// TestPodCannotTouchAnotherPod: a process in pod B that is root in its own user namespace
// (all capabilities there; uid 1000 on the host, as a pod with hostUsers: false) tries every
// way to pod A's state it has: its pins by path (even with the bpffs root open to all, so
// only divert's own modes stand in the way), its maps, links and programs by ID, removing
// or renaming pins, detaching through the cgroup, making maps of its own, and leaving its
// cgroup. Each must fail, and pod A must stay attached with every pin in place.
func TestPodCannotTouchAnotherPod(t *testing.T) {
	network := testpod.NewNetwork(t)
	podA, podB := network.AddPod(t), network.AddPod(t)
	opts := divertest.BPFFS(t)
	divertest.Attach(t, podA, opts, divertest.Config(t))
	before := divertest.AttachedPrograms(t, podA)

	// Open the way to the bpffs root (test-made directories), and the root itself.
	for d := opts.BPFFS; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	v := victim{PinDir: loader.PinDir(opts, podA.Name), Cgroup: podA.CgroupPath, CgroupFS: divertest.Cgroup2Mount(t)}
	entries, err := os.ReadDir(v.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		v.Pins = append(v.Pins, e.Name())
		if e.Type()&os.ModeSymlink != 0 {
			continue // the pod's slot
		}
		path := filepath.Join(v.PinDir, e.Name())
		if strings.HasPrefix(e.Name(), "link_") {
			l, err := link.LoadPinnedLink(path, nil)
			if err != nil {
				t.Fatal(err)
			}
			info, err := l.Info()
			if err != nil {
				t.Fatal(err)
			}
			v.LinkIDs = append(v.LinkIDs, uint32(info.ID))
			v.ProgIDs = append(v.ProgIDs, uint32(info.Program))
			l.Close()
			continue
		}
		v.MapIDs = append(v.MapIDs, pinnedMapID(t, path))
	}

	// The node's maps (every pod's slot, the outer maps that lead to each pod's maps) are
	// as much pod A's state: the attacker gets their ids too.
	nodeMaps, err := os.ReadDir(filepath.Join(opts.BPFFS, "divert_node", "maps"))
	if err != nil || len(nodeMaps) == 0 {
		t.Fatalf("node maps %v, %v", nodeMaps, err)
	}
	for _, e := range nodeMaps {
		v.MapIDs = append(v.MapIDs, pinnedMapID(t, filepath.Join(opts.BPFFS, "divert_node", "maps", e.Name())))
	}

	arg, _ := json.Marshal(v)
	cg, err := unix.Open(podB.CgroupPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cg)
	cmd := testpod.HelperCommand("attacker", string(arg))
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWUSER,
		// setuid(0) once the map is written: uid 1000 to the kernel, root in the namespace.
		Credential:  &syscall.Credential{Uid: 0, Gid: 0, NoSetGroups: true},
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: divertest.AppUID, Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: divertest.AppUID, Size: 1}},
		UseCgroupFD: true,
		CgroupFD:    cg,
	}
	out, err := nsexec.CombinedOutput(podB.NetNSPath, cmd)
	if err != nil {
		t.Fatalf("attacker: %v\n%s", err, out)
	}
	var report struct {
		UID     int      `json:"uid"`
		CapEff  string   `json:"capEff"`
		Attacks []attack `json:"attacks"`
	}
	if err := json.Unmarshal(out, &report); err != nil {
		t.Fatalf("attacker's report %q: %v", out, err)
	}
	// The premise: root with every capability, in its own namespace.
	if report.UID != 0 || report.CapEff == "" || strings.Trim(report.CapEff, "0") == "" {
		t.Fatalf("the attacker is uid %d with capabilities %q, want root with all of them in its namespace", report.UID, report.CapEff)
	}
	if len(report.Attacks) < 10 {
		t.Fatalf("only %d attacks ran: %+v", len(report.Attacks), report.Attacks)
	}
	for _, a := range report.Attacks {
		if a.Err == "" {
			t.Errorf("a pod's root (user namespace) could %s", a.What)
		} else {
			t.Logf("%s: %s", a.What, a.Err)
		}
	}

	if after := divertest.AttachedPrograms(t, podA); after != before {
		t.Errorf("pod A has %d programs attached after the attack, %d before", after, before)
	}
	left, err := os.ReadDir(v.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range left {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, v.Pins) {
		t.Errorf("pod A's pins are %v after the attack, %v before", names, v.Pins)
	}
}

// runAttacker is the attacker helper: it tries each way in and prints what stopped it. Its
// one argument is the victim, as JSON.
func runAttacker(args []string) error {
	var v victim
	if len(args) != 1 {
		return errors.New("usage: attacker VICTIM-JSON")
	}
	if err := json.Unmarshal([]byte(args[0]), &v); err != nil {
		return err
	}
	var attacks []attack
	try := func(what string, err error) {
		s := ""
		if err != nil {
			s = err.Error()
		}
		attacks = append(attacks, attack{what, s})
	}
	_, err := os.ReadDir(v.PinDir)
	try("list the pins", err)
	for _, p := range v.Pins {
		path := filepath.Join(v.PinDir, p)
		if strings.HasPrefix(p, "link_") {
			l, err := link.LoadPinnedLink(path, nil)
			if err == nil {
				err = l.Unpin() // it would detach once closed
				l.Close()
			}
			try("open the pinned link "+p, err)
		} else {
			m, err := ebpf.LoadPinnedMap(path, nil)
			if err == nil {
				m.Close()
			}
			try("open the pinned map "+p, err)
		}
		try("remove the pin "+p, os.Remove(path))
	}
	try("rename the pod's pin directory", os.Rename(v.PinDir, v.PinDir+"-gone"))
	try("remove the pod's pin directory", os.RemoveAll(v.PinDir))
	for _, id := range v.MapIDs {
		m, err := ebpf.NewMapFromID(ebpf.MapID(id))
		if err == nil {
			m.Close()
		}
		try(fmt.Sprintf("open map %d by ID", id), err)
	}
	for _, id := range v.LinkIDs {
		l, err := link.NewFromID(link.ID(id))
		if err == nil {
			l.Close()
		}
		try(fmt.Sprintf("open link %d by ID", id), err)
	}
	for _, id := range v.ProgIDs {
		p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
		if err == nil {
			p.Close()
		}
		try(fmt.Sprintf("open program %d by ID", id), err)
	}
	cg, err := os.Open(v.Cgroup)
	if err == nil {
		_, err = link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: ebpf.AttachCGroupInet4Connect})
		cg.Close()
	}
	try("list the programs on the pod's cgroup", err)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err == nil {
		m.Close()
	}
	try("create a map of its own", err)
	try("move itself to the root cgroup", os.WriteFile(filepath.Join(v.CgroupFS, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0))

	status, _ := os.ReadFile("/proc/self/status")
	var capEff string
	for _, l := range strings.Split(string(status), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "CapEff:" {
			capEff = f[1]
		}
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{"uid": os.Getuid(), "capEff": capEff, "attacks": attacks})
}

// pinnedMapID is the id of the map pinned at path.
func pinnedMapID(t *testing.T, path string) uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return uint32(id)
}
