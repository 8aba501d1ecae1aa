// Package loader attaches divert to one pod: the cgroup programs to the pod's cgroup v2
// directory, with every map and link pinned under <bpffs>/divert/<pod id>/ so capture
// outlives the loader (init-container mode) and a later run can update or remove it.
//
// Attach is all-or-nothing and Detach removes exactly what Attach made. The loader knows
// cgroups, network namespaces and policy; nothing about Kubernetes.
//
// One job per file: attach.go (Attach, update in place, Detach), pins.go (pin directories,
// the bpffs lock, staging and its clean-up), programs.go (the program table and loading),
// upgrade.go (whether running programs are this build's, and swapping them), names.go
// (bpf2go's maps and programs by name), target.go (checks of the pod's cgroup and netns),
// crash.go (arming), overlap.go (another pod in the way), listeners.go, defunct.go (GC),
// status.go, probe.go, fallback.go and storage.go.
package loader

import (
	"errors"
	"fmt"

	"github.com/meshdivert/divert/internal/crashpoint"
)

// DefaultBPFFS is where bpffs is expected (and mounted if nothing is there).
const DefaultBPFFS = "/sys/fs/bpf"

var (
	// ErrNotAttached is returned by Detach and Status for a pod with no pins.
	ErrNotAttached = errors.New("not attached")
	// ErrIncompatible is wrapped by Attach's error for a pod whose pins an older or newer
	// divert made and this build cannot update in place (a map missing, or of another
	// layout): detaching it and attaching again is the way out.
	ErrIncompatible = errors.New("attached by an incompatible divert version")
)

// InputError is a problem with what the caller asked for, named by the setting at fault,
// so it can be reported in one line with the fix. The CLI names its flag of the same name.
type InputError struct {
	Field string // "pod-id", "cgroup", "netns", "bpffs"
	Value string
	Msg   string // what is wrong, and the fix
	Err   error  // a sentinel the problem is, if any (ErrCgroupRoot)
}

func (e *InputError) Error() string {
	return fmt.Sprintf("invalid %s %q: %s", e.Field, e.Value, e.Msg)
}

func (e *InputError) Unwrap() error { return e.Err }

// Pod is what the loader needs to know about a pod.
type Pod struct {
	// ID names the pod's pin directory; letters, digits, '_' and '-'.
	ID string
	// Cgroup is the pod's cgroup v2 directory; every process of the pod is at or below it.
	Cgroup string
	// NetNS is a path to the pod's network namespace, read for the pod's own addresses.
	NetNS string
	// Name is the pod's Kubernetes "namespace/name" if known, for status; an update
	// without one keeps the name recorded before.
	Name string
}

// Options tune what is attached and where state lives.
type Options struct {
	// BPFFS is the bpffs mount to pin under; DefaultBPFFS if empty.
	BPFFS string
	// NoOutbound leaves outbound connections alone (no connect4 program).
	NoOutbound bool
	// NoInbound leaves inbound connections alone (no sk_lookup program).
	NoInbound bool
}

func (o Options) root() string {
	if o.BPFFS == "" {
		return DefaultBPFFS
	}
	return o.BPFFS
}

// validID says whether id is 1-128 letters, digits, '_' or '-', starting with a letter or
// digit: bpffs refuses '.' anywhere in a name, so ids cannot have one. Checked by hand: the
// equivalent regexp (names_test.go) costs every process ~0.5 ms of allocations to compile.
func validID(id string) bool {
	if len(id) == 0 || len(id) > 128 {
		return false
	}
	for i := range len(id) {
		if c := id[i]; !isAlnum(c) && (i == 0 || c != '_' && c != '-') {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

const badID = "use 1-128 letters, digits, '_' or '-' (bpffs forbids '.'), starting with a letter or digit"

// step names a change Attach or Detach just made to the kernel or the bpffs: the crash
// tests kill the process there (internal/crashpoint).
func step(name string) { crashpoint.Step(name) }
