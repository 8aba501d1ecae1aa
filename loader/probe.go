package loader

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/cgroups"
)

// kernelNeed is one kernel feature divert's programs use, and what it is for.
type kernelNeed struct {
	what  string // for the one-line reason
	probe func() error
	// What is probed, for the test that keeps this list in step with bpf/divert.c.
	progType ebpf.ProgramType
	helper   asm.BuiltinFunc
	mapType  ebpf.MapType
}

func needProgType(pt ebpf.ProgramType, what string) kernelNeed {
	return kernelNeed{what: fmt.Sprintf("program type %s (%s)", pt, what), progType: pt,
		probe: func() error { return features.HaveProgramType(pt) }}
}

func needHelper(pt ebpf.ProgramType, fn asm.BuiltinFunc) kernelNeed {
	return kernelNeed{what: fmt.Sprintf("helper %s in %s programs", fn, pt), progType: pt, helper: fn,
		probe: func() error { return features.HaveProgramHelper(pt, fn) }}
}

func needMapType(mt ebpf.MapType) kernelNeed {
	return kernelNeed{what: fmt.Sprintf("map type %s", mt), mapType: mt,
		probe: func() error { return features.HaveMapType(mt) }}
}

// kernelNeeds is what bpf/divert.c uses, cheapest and most telling first: a kernel that
// lacks a program type gets that named rather than one of its helpers. Keep it in step with
// the C file (TestProbeCoversPrograms checks it against the compiled programs).
var kernelNeeds = []kernelNeed{
	needProgType(ebpf.CGroupSockAddr, "cgroup/connect4 and connect6: outbound capture, Linux 4.17+"),
	needProgType(ebpf.SockOps, "sockops: carries the original destination to the proxy, Linux 4.13+"),
	needProgType(ebpf.CGroupSockopt, "cgroup/getsockopt: SO_ORIGINAL_DST, Linux 5.3+"),
	needProgType(ebpf.SkLookup, "sk_lookup: inbound capture, Linux 5.9+"),
	needHelper(ebpf.CGroupSockAddr, asm.FnGetCurrentUidGid),
	needHelper(ebpf.CGroupSockAddr, asm.FnSkStorageGet),
	// The socket's owner (what xt_owner matches) before bpf_cast_to_kern_ctx (6.2), 5.10+.
	needHelper(ebpf.CGroupSockAddr, asm.FnSkcToTcpSock),
	needHelper(ebpf.SockOps, asm.FnGetSocketCookie),
	needHelper(ebpf.SockOps, asm.FnSockOpsCbFlagsSet),
	needHelper(ebpf.SockOps, asm.FnSkStorageGet),
	// The original destination travels to the proxy as a TCP option, Linux 5.10+.
	needHelper(ebpf.SockOps, asm.FnReserveHdrOpt),
	needHelper(ebpf.SockOps, asm.FnStoreHdrOpt),
	needHelper(ebpf.SockOps, asm.FnLoadHdrOpt),
	needHelper(ebpf.CGroupSockopt, asm.FnSkStorageGet),
	needHelper(ebpf.SockOps, asm.FnSockMapUpdate),
	needHelper(ebpf.SkLookup, asm.FnSkAssign),
	needHelper(ebpf.SkLookup, asm.FnSkRelease),
	// The pod's slot, in cgroup storage shared by the attach types (key: the cgroup id
	// alone, Linux 5.9+), read by every cgroup program (node.go).
	needHelper(ebpf.CGroupSockAddr, asm.FnGetLocalStorage),
	needHelper(ebpf.SockOps, asm.FnGetLocalStorage),
	needHelper(ebpf.CGroupSockopt, asm.FnGetLocalStorage),
	needMapType(ebpf.CGroupStorage),
	needMapType(ebpf.ArrayOfMaps), // the pods' maps by slot
	needMapType(ebpf.LPMTrie),
	needMapType(ebpf.SkStorage),
	needMapType(ebpf.PerCPUArray),
	needMapType(ebpf.SockMap),
	needMapType(ebpf.LRUHash), // transparent_syns (TPROXY mode)
	// divert trace (bpf/trace.h): the node's ring buffer (Linux 5.8+), the tracer's socket
	// looked up in a sockmap and released, the connecting task's cgroup (5.7+).
	needMapType(ebpf.RingBuf),
	needHelper(ebpf.CGroupSockAddr, asm.FnRingbufReserve),
	needHelper(ebpf.CGroupSockAddr, asm.FnRingbufSubmit),
	needHelper(ebpf.CGroupSockAddr, asm.FnRingbufQuery),
	needHelper(ebpf.CGroupSockAddr, asm.FnSkRelease),
	needHelper(ebpf.CGroupSockAddr, asm.FnGetCurrentCgroupId),
	needHelper(ebpf.CGroupSockAddr, asm.FnGetSocketCookie),
	needHelper(ebpf.SockOps, asm.FnRingbufReserve),
	needHelper(ebpf.SockOps, asm.FnRingbufSubmit),
	needHelper(ebpf.SockOps, asm.FnRingbufQuery),
	needHelper(ebpf.SkLookup, asm.FnRingbufReserve),
	needHelper(ebpf.SkLookup, asm.FnRingbufSubmit),
	needHelper(ebpf.SkLookup, asm.FnRingbufQuery),
}

// probeKernel runs the feature probes once per process: a kernel does not change under it,
// and cilium/ebpf caches the individual results anyway.
var probeKernel = sync.OnceValue(func() error {
	for _, n := range kernelNeeds {
		if err := n.probe(); err != nil {
			return notSupported(n.what, err)
		}
	}
	return nil
})

// notSupported turns a probe failure into one line that wraps ebpf.ErrNotSupported, also
// when the probe itself failed (no permission to load programs is as fatal as a missing
// feature for the caller, who needs a yes or no).
func notSupported(what string, err error) error {
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("this kernel lacks %s: %w", what, err)
	}
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("cannot load BPF programs here (probing %s: %s; needs CAP_BPF and CAP_NET_ADMIN, or a privileged container): %w", what, msg, ebpf.ErrNotSupported)
	}
	return fmt.Errorf("probing %s failed (%s): %w", what, msg, ebpf.ErrNotSupported)
}

// Probe reports whether the eBPF backend can work here: the program types, helpers and
// map types divert's programs use, cgroup v2 (mounted: the programs hang off the pod's
// cgroup v2 directory), a bpffs at opts.BPFFS or the right to mount one, and the kernel's
// verifier accepting the programs themselves. The programs it loads are the node's
// (node.go): where a bpffs is mounted they are pinned there for every attach of this build
// to use, so that nothing is loaded twice; otherwise it changes nothing (a bpffs it mounts
// to test is unmounted at once).
//
// The error is one line naming what is missing and wraps ebpf.ErrNotSupported, so callers
// can fall back to the iptables backend with errors.Is. Requires Linux 5.9 or later.
func Probe(opts Options) error {
	// This build's programs already pinned on the node were loaded by this kernel: the
	// feature probes and the load would only repeat that (the sk_storage probe alone waits
	// out an RCU grace period, 17-40 ms here, in every init container).
	if buildPinned(opts) {
		return probeCgroup2()
	}
	if err := probeKernel(); err != nil {
		return err
	}
	if err := probeCgroup2(); err != nil {
		return err
	}
	if err := probeBPFFS(opts.root()); err != nil {
		return err
	}
	// The probes above cannot see verifier limits of older kernels; loading the real
	// programs can. They are the node's (node.go): loaded once, pinned where the bpffs is
	// mounted, so that the attach after the probe loads nothing again, and reused by every
	// later probe and attach of this build.
	if err := probePrograms(opts); err != nil {
		return fmt.Errorf("%s: %w", strings.ReplaceAll(err.Error(), "\n", " "), ebpf.ErrNotSupported)
	}
	return nil
}

// buildPinned says whether this build's node programs are pinned under opts' bpffs and
// this process may use them: opening one is the bpf() access an attach needs too.
func buildPinned(opts Options) bool {
	if !IsBPFFS(opts.root()) {
		return false
	}
	dir := filepath.Join(buildsDir(opts), buildTag())
	if _, err := os.Readlink(filepath.Join(dir, skLookupPin)); err != nil {
		return false
	}
	prog, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "divert_connect4"), nil)
	if err != nil {
		return false
	}
	prog.Close()
	return true
}

// probePrograms loads the node's programs of this build: pinned (loadNode) where the
// bpffs is mounted, else only loaded and closed again.
func probePrograms(opts Options) error {
	if IsBPFFS(opts.root()) {
		unlock, err := lockState(opts)
		if err != nil {
			return err
		}
		defer unlock()
		n, err := loadNode(opts)
		if err != nil {
			return err
		}
		n.Close()
		return nil
	}
	if err := raiseMemlock(); err != nil {
		return err
	}
	spec, err := divertSpec()
	if err != nil {
		return err
	}
	n := &node{maps: map[string]*ebpf.Map{}}
	defer n.Close()
	for _, name := range nodeMapNames() {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			return fmt.Errorf("create node map %s: %w", name, err)
		}
		n.maps[name] = m
	}
	if n.progs, err = loadNodePrograms(spec, n.maps); err != nil {
		return err
	}
	return loadSkLookupTemplate(n)
}

func probeCgroup2() error {
	if !fileHasLine("/proc/filesystems", "cgroup2") {
		return fmt.Errorf("this kernel has no cgroup v2 (cgroup2 is not in /proc/filesystems): %w", ebpf.ErrNotSupported)
	}
	if _, err := cgroups.Mountpoint(); err != nil {
		return fmt.Errorf("no cgroup v2 file system is mounted here (mount the host's /sys/fs/cgroup into the container): %w", ebpf.ErrNotSupported)
	}
	return nil
}

// probeBPFFS checks that pins can be made under root: it is a bpffs already, or one can be
// mounted (tried on a temporary directory, which is removed again).
func probeBPFFS(root string) error {
	if IsBPFFS(root) {
		return nil
	}
	if !fileHasLine("/proc/filesystems", "bpf") {
		return fmt.Errorf("this kernel has no bpf file system to pin programs in: %w", ebpf.ErrNotSupported)
	}
	dir, err := os.MkdirTemp("", "divert-bpffs-probe-")
	if err != nil {
		return fmt.Errorf("probe bpffs: %v: %w", err, ebpf.ErrNotSupported)
	}
	defer os.Remove(dir)
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("%s is not a bpffs and one cannot be mounted here (%v); mount the host's /sys/fs/bpf: %w", root, err, ebpf.ErrNotSupported)
	}
	return unix.Unmount(dir, unix.MNT_DETACH)
}

// fileHasLine reports whether a whitespace-separated field of some line of file is word.
func fileHasLine(file, word string) bool {
	f, err := os.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		for _, field := range strings.Fields(sc.Text()) {
			if field == word {
				return true
			}
		}
	}
	return false
}

// ProgramPlan is one program Attach would attach, for dry runs and documentation.
type ProgramPlan struct {
	// Name is the program's name in bpf/divert.c.
	Name string
	// Attach is the attach type, e.g. "CGroupInet4Connect".
	Attach string
	// Target is "cgroup" (the pod's cgroup v2 directory) or "netns" (its network namespace).
	Target string
	// Pin is the link's pin name under the pod's pin directory.
	Pin string
	// AttachType is Attach as cilium/ebpf names it, for checks against the kernel.
	AttachType ebpf.AttachType
	// Inbound and Outbound say which directions need it (getsockopt and sockops: both).
	Inbound, Outbound bool
}

// Plan lists the programs Attach attaches with opts, in attach order.
func Plan(opts Options) []ProgramPlan {
	var out []ProgramPlan
	for _, p := range programs {
		if !p.wanted(opts) {
			continue
		}
		out = append(out, ProgramPlan{Name: p.name, Attach: p.attach.String(), Target: p.target(), Pin: p.pin,
			AttachType: p.attach, Inbound: p.inbound, Outbound: p.outbound})
	}
	return out
}
