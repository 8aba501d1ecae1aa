package loader_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// Every map a pod's sk_lookup program uses is one the node holds for all pods, so loading
// it for a slot (loadSkLookup, MapReplacements: the node's maps) creates nothing per pod
// but its .rodata, which holds the slot.
func TestSkLookupUsesOnlyNodeMaps(t *testing.T) {
	used, err := loader.SkLookupUsedMaps()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(used, ".rodata") || !slices.Contains(used, "slot_config_map") {
		t.Fatalf("sk_lookup uses %v: no .rodata (its slot) or slot_config_map?", used)
	}
	for _, name := range used {
		if name != ".rodata" && !slices.Contains(loader.NodeMaps(), name) {
			t.Errorf("sk_lookup uses map %s, which is not a node map: each pod's load would create one", name)
		}
	}
}

const newSlotChildEnv = "DIVERT_LOADER_NEW_SLOT_CHILD"

// runNewSlotChildIfRequested attaches the pod the parent names, in this fresh process, and
// prints how many times it parsed divert.c's object and the attach's CPU time in µs.
func runNewSlotChildIfRequested() {
	v := os.Getenv(newSlotChildEnv)
	if v == "" {
		return
	}
	var job crashJob
	err := json.Unmarshal([]byte(v), &job)
	var cfg policy.Config
	if err == nil {
		cfg, err = parseFlags(job.Flags)
	}
	cpu0 := cpuTime()
	if err == nil {
		err = loader.Attach(context.Background(), job.Pod, &cfg, loader.Options{BPFFS: job.BPFFS})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(loader.DivertParses(), (cpuTime() - cpu0).Microseconds())
	os.Exit(0)
}

// A pod that takes a new slot on a warm node (the node's programs pinned, the slot filled
// with maps by an earlier pod, its sk_lookup never loaded) loads only its sk_lookup, from
// sk_lookup's small object: a fresh process attaching it parses divert.c's object not at
// all. Its program uses the node's maps and a .rodata of its own, and captures inbound.
func TestNewSlotParsesOnlySkLookupObject(t *testing.T) {
	net := testpod.NewNetwork(t)
	opts := divertest.BPFFS(t)
	a := podWithProxy(t, net, "app-a", "proxy-a")
	b := podWithProxy(t, net, "app-b", "proxy-b")
	divertest.Attach(t, a, opts, divertest.Config(t))
	filled, err := loader.FilledSlots(opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(filled) < 2 {
		t.Fatalf("slots filled after the first pod: %v; the test needs a filled free slot", filled)
	}

	lb := loader.Pod{ID: b.Name, Cgroup: b.CgroupPath, NetNS: b.NetNSPath}
	t.Cleanup(func() { loader.Detach(b.Name, opts) })
	job, _ := json.Marshal(crashJob{Pod: lb, BPFFS: opts.BPFFS})
	cmd, out := divertest.ChildCmd(newSlotChildEnv + "=" + string(job))
	if err := cmd.Run(); err != nil {
		t.Fatalf("attach in a child: %v: %s", err, out)
	}
	if parses := strings.Fields(out.String()); len(parses) != 2 || parses[0] != "0" {
		t.Errorf("the child parsed divert.c's object %q times attaching a pod to a new slot, want 0", parses)
	}

	landed(t, "pod b inbound", net.Dial(t, testpod.Target{Dst: netip.AddrPortFrom(b.Addr, 8080)})[0], "proxy-b")
	sa, err := loader.Status(a.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := loader.Status(b.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	nodeMaps, err := loader.NodeMapIDs(opts)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range sb.Programs {
		if p.Name != "divert_sk_lookup" {
			continue
		}
		if p.ProgramID == sa.Programs[i].ProgramID {
			t.Fatalf("pod b runs pod a's sk_lookup %d: not a new slot", p.ProgramID)
		}
		prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(p.ProgramID))
		if err != nil {
			t.Fatal(err)
		}
		defer prog.Close()
		info, err := prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids, _ := info.MapIDs()
		var own []string
		for _, id := range ids {
			if nodeMaps[id] != "" {
				continue
			}
			m, err := ebpf.NewMapFromID(id)
			if err != nil {
				t.Fatal(err)
			}
			mi, err := m.Info()
			m.Close()
			if err != nil {
				t.Fatal(err)
			}
			own = append(own, mi.Name)
		}
		if len(own) != 1 || !strings.HasSuffix(own[0], ".rodata") {
			t.Errorf("pod b's sk_lookup has maps of its own %v, want its .rodata alone", own)
		}
		return
	}
	t.Fatal("pod b has no sk_lookup program")
}

// BenchmarkNewSlotFreshProcess measures what issue 24 is about: the CPU time of a fresh
// process (an init container's divert run) that attaches a pod to a new slot on a warm
// node, the slot filled with maps by an earlier pod but its sk_lookup never loaded. Each
// iteration is one child process (this test binary: its start is in the figure, the same
// for every build); between them the pod is detached and the slot's sk_lookup unpinned.
// It reports the child's user+system CPU (cpu-ms/op) and that of its loader.Attach call
// alone (attach-cpu-ms/op). Needs root:
//
//	go test -run '^$' -bench NewSlotFreshProcess -benchtime 20x ./loader/
func BenchmarkNewSlotFreshProcess(b *testing.B) {
	net := testpod.NewNetwork(b)
	opts := divertest.BPFFS(b)
	divertest.Attach(b, podWithProxy(b, net, "app-a", "proxy-a"), opts, divertest.Config(b))
	p := podWithProxy(b, net, "app-b", "proxy-b")
	lp := loader.Pod{ID: p.Name, Cgroup: p.CgroupPath, NetNS: p.NetNSPath}
	b.Cleanup(func() { loader.Detach(p.Name, opts) })
	job, _ := json.Marshal(crashJob{Pod: lp, BPFFS: opts.BPFFS})
	var cpu, attach time.Duration
	b.ResetTimer()
	for range b.N {
		cmd, out := divertest.ChildCmd(newSlotChildEnv + "=" + string(job))
		if err := cmd.Run(); err != nil {
			b.Fatalf("attach in a child: %v: %s", err, out)
		}
		cpu += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
		f := strings.Fields(out.String())
		us, err := strconv.Atoi(f[len(f)-1])
		if err != nil {
			b.Fatalf("child said %q", out)
		}
		attach += time.Duration(us) * time.Microsecond
		b.StopTimer()
		slot, err := loader.SlotOf(opts, p.Name)
		if err != nil {
			b.Fatal(err)
		}
		if err := loader.Detach(p.Name, opts); err != nil {
			b.Fatal(err)
		}
		if err := loader.ForgetSlotSkLookup(opts, slot); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(cpu.Microseconds())/1e3/float64(b.N), "cpu-ms/op")
	b.ReportMetric(float64(attach.Microseconds())/1e3/float64(b.N), "attach-cpu-ms/op")
}
