// The programs: which ones attach where and in what order, loading them from the embedded
// collection, and closing what was loaded.

package loader

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshdivert/divert/bpf"
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

// parsedSpec is the embedded collection, parsed once per process: parsing the ELF is the
// same work for every pod (a node agent attaches hundreds).
var parsedSpec = sync.OnceValues(func() (*ebpf.CollectionSpec, error) {
	divertParses.Add(1)
	return bpf.LoadDivert()
})

// divertParses counts parsedSpec's parses, for tests: a pod taking a new slot on a warm
// node must parse only sk_lookup's small object (sklookup.go).
var divertParses atomic.Int32

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
