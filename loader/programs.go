// The programs: which ones attach where and in what order, loading them from the embedded
// collection, and closing what was loaded.

package loader

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/maps"
)

// program is one attached program: its name in the collection, how it attaches, the name of
// its link's pin, and which directions need it. The order is the attach order: the programs
// that answer for a redirected connection go in before the ones that start redirecting.
type program struct {
	name              string
	attach            ebpf.AttachType
	pin               string
	inbound, outbound bool
}

var programs = []program{
	{"divert_getsockopt", ebpf.AttachCGroupGetsockopt, "link_getsockopt", true, true},
	{"divert_sockops", ebpf.AttachCGroupSockOps, "link_sockops", true, true},
	{"divert_sk_lookup", ebpf.AttachSkLookup, "link_sk_lookup", true, false},
	// DNS capture: the hooks that show the app its nameserver go in before the ones that
	// send its queries to the agent.
	{"divert_recvmsg4", ebpf.AttachCGroupUDP4Recvmsg, "link_recvmsg4", false, true},
	{"divert_recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, "link_recvmsg6", false, true},
	{"divert_getpeername4", ebpf.AttachCgroupInet4GetPeername, "link_getpeername4", false, true},
	{"divert_getpeername6", ebpf.AttachCgroupInet6GetPeername, "link_getpeername6", false, true},
	{"divert_connect4", ebpf.AttachCGroupInet4Connect, "link_connect4", false, true},
	{"divert_connect6", ebpf.AttachCGroupInet6Connect, "link_connect6", false, true},
	{"divert_sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, "link_sendmsg4", false, true},
	{"divert_sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, "link_sendmsg6", false, true},
}

// wanted reports whether opts need the program.
func (p program) wanted(opts Options) bool {
	return (p.inbound && !opts.NoInbound) || (p.outbound && !opts.NoOutbound)
}

// attachTo attaches the program to the pod: sk_lookup to its network namespace, the rest
// to its cgroup.
func (p program) attachTo(pod Pod, prog *ebpf.Program) (link.Link, error) {
	var l link.Link
	var err error
	if p.attach == ebpf.AttachSkLookup {
		var ns *os.File
		if ns, err = os.Open(pod.NetNS); err == nil {
			l, err = link.AttachNetNs(int(ns.Fd()), prog)
			ns.Close()
		}
	} else {
		l, err = link.AttachCgroup(link.CgroupOptions{Path: pod.Cgroup, Attach: p.attach, Program: prog})
	}
	if err != nil {
		return nil, attachError(p, pod, err)
	}
	return l, nil
}

// objects is what gets loaded: the programs and maps, not bpf2go's variables (they only
// exist to carry types into BTF, and would cost a .bss map per pod).
type objects struct {
	bpf.DivertPrograms
	bpf.DivertMaps
}

// program returns the loaded program of that name, or nil.
func (o *objects) program(name string) *ebpf.Program {
	for _, f := range programFields(&o.DivertPrograms) {
		if f.name == name {
			return *f.ptr
		}
	}
	return nil
}

// parsedSpec is the embedded collection, parsed once per process: parsing the ELF is the
// same work for every pod (a node agent attaches hundreds).
var parsedSpec = sync.OnceValues(bpf.LoadDivert)

// divertSpec returns a copy of the embedded collection spec for one load: cilium/ebpf does
// not promise that loading leaves a spec as it was, and loads may run concurrently (Probe
// takes no lock).
func divertSpec() (*ebpf.CollectionSpec, error) {
	spec, err := parsedSpec()
	if err != nil {
		return nil, err
	}
	return spec.Copy(), nil
}

func loadObjects(objs *objects, pinned *maps.Maps) error {
	// Kernels before 5.11 charge BPF objects to RLIMIT_MEMLOCK (64 KiB by default before
	// 5.16): lift it. On newer kernels (memcg accounting) this does nothing.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("raise RLIMIT_MEMLOCK for BPF maps (needs CAP_SYS_RESOURCE on kernels before 5.11): %w", err)
	}
	spec, err := divertSpec()
	if err != nil {
		return fmt.Errorf("load embedded BPF spec: %w", err)
	}
	var opts ebpf.CollectionOptions
	opts.Cache, opts.Programs.KernelTypes = btfCache, kernelTypes()
	if pinned != nil {
		opts.MapReplacements = map[string]*ebpf.Map{}
		forEachLoadMap(pinned, func(name string, m *ebpf.Map) { opts.MapReplacements[name] = m })
	}
	if err := spec.LoadAndAssign(objs, &opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return fmt.Errorf("kernel rejected divert's programs: %v", verr) // one line; %+v has the log
		}
		return fmt.Errorf("load BPF programs: %w", err)
	}
	rememberTags(objs)
	return nil
}

// closeAll closes what was loaded (bpf2go's Close skips the nil fields of a failed load).
func closeAll(o *objects) {
	o.DivertMaps.Close()
	o.DivertPrograms.Close()
}

// target is what the program attaches to: "netns" (sk_lookup) or "cgroup" (the rest).
func (p program) target() string {
	if p.attach == ebpf.AttachSkLookup {
		return "netns"
	}
	return "cgroup"
}

// attachError names the program and where it was to go. A kernel without the attach type
// wraps ebpf.ErrNotSupported, for the caller to offer another backend.
func attachError(p program, pod Pod, err error) error {
	where := pod.Cgroup
	if p.target() == "netns" {
		where = pod.NetNS
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("attach %s to %s %s: this kernel lacks BPF %s support: %w", p.name, p.target(), where, p.attach, err)
	}
	return fmt.Errorf("attach %s to %s %s: %w", p.name, p.target(), where, err)
}
