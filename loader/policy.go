package loader

import (
	"bytes"
	"fmt"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/meshdivert/divert/policy"
)

// What the eBPF rendering of a policy cannot express, and what it needs of the kernel.

// PolicyError is a setting the eBPF backend cannot honour here. It wraps
// ebpf.ErrNotSupported, so istio-iptables mode's auto falls back to iptables (which renders
// every setting) and --mode ebpf, divert attach and the node agent refuse with Why.
type PolicyError struct {
	// Setting names the flag or variable, as istio-iptables spells it.
	Setting string
	// Why is the reason, in words a user can act on.
	Why string
}

func (e *PolicyError) Error() string { return e.Setting + ": " + e.Why }

func (e *PolicyError) Unwrap() error { return ebpf.ErrNotSupported }

// Reasons, one line each (docs/istio.md quotes them).
const (
	whyInterfaces = "eBPF cannot exclude interfaces: the connect hooks decide before routing picks " +
		"the interface a connection leaves by (sk_lookup sees the one it arrives on only from Linux 5.17)"
	whyKubeVirt = "eBPF cannot capture a virtual interface's traffic: a VM's connections are routed " +
		"through the pod, never connect()ed in it nor delivered to one of its sockets, so neither " +
		"the connect hooks nor sk_lookup see them"
	whyOwnerGroups = "the connect hooks read the socket file's group (what xt_owner matches) through " +
		"bpf_cast_to_kern_ctx and the kernel's BTF, which need Linux 6.2 or later"
)

// DropInvalidNote says why --drop-invalid needs nothing under eBPF; the CLI and the node
// agent print it when they accept the setting.
const DropInvalidNote = "--drop-invalid: nothing to install with eBPF: istio drops conntrack-INVALID " +
	"packets because, NATed, such a packet escapes the translation and reaches the app's port, " +
	"which resets the connection; divert does no NAT, so every packet of a captured connection " +
	"already carries the address of the socket that holds it"

// CheckPolicy says whether the eBPF backend can express cfg on this kernel: nil, or a
// *PolicyError naming the first setting it cannot.
func CheckPolicy(cfg *policy.Config) error {
	if len(cfg.ExcludeInterfaces) > 0 {
		return &PolicyError{Setting: "-c/--" + policy.FlagExcludeInterfaces + " " + strings.Join(cfg.ExcludeInterfaces, ","), Why: whyInterfaces}
	}
	if len(cfg.KubeVirtInterfaces) > 0 {
		return &PolicyError{Setting: "-k/--" + policy.FlagKubeVirtInterfaces + " " + strings.Join(cfg.KubeVirtInterfaces, ","), Why: whyKubeVirt}
	}
	if cfg.FiltersOwnerGroups() {
		if err := readsSocketOwner(); err != nil {
			setting := "$" + policy.EnvVar(policy.FlagOwnerGroups)
			if !cfg.OutboundOwnerGroups.Only {
				setting = "$" + policy.EnvVar(policy.FlagOwnerGroupsExclude)
			}
			return &PolicyError{Setting: setting, Why: fmt.Sprintf("%s (%v)", whyOwnerGroups, err)}
		}
	}
	return nil
}

// socketOwnerKfunc is what the programs use to reach the socket's file; a kernel whose BTF
// has it runs that code (the loader then verified it), others resolve it to nothing.
const socketOwnerKfunc = "bpf_cast_to_kern_ctx"

// btfCache holds the kernel's BTF for every load of the process: the programs' CO-RE reads
// and their kfunc resolve against it, and parsing it afresh per attach would cost ~100 ms
// of CPU each (cilium/ebpf's default is a cache per load).
var btfCache = btf.NewCache()

// readsSocketOwner reports whether the programs can read a socket file's group here.
var readsSocketOwner = sync.OnceValue(func() error {
	spec, err := btfCache.Kernel()
	if err != nil {
		return fmt.Errorf("no kernel BTF: %w", err)
	}
	var fn *btf.Func
	if err := spec.TypeByName(socketOwnerKfunc, &fn); err != nil {
		return fmt.Errorf("no kfunc %s: %w", socketOwnerKfunc, err)
	}
	return nil
})

// kernelTypes is what CO-RE relocates against: the kernel's BTF, or where the kernel has
// none, an empty spec, so the code that reads kernel structures resolves to nothing (and,
// guarded by the weak kfunc, is never reached) instead of failing the whole load.
var kernelTypes = sync.OnceValue(func() *btf.Spec {
	if _, err := btfCache.Kernel(); err == nil {
		return nil // cilium/ebpf's default: the kernel's (from btfCache)
	}
	var b btf.Builder
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		return nil
	}
	empty, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		return nil
	}
	return empty
})
