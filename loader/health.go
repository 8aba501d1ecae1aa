package loader

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
)

// HasProgram reports whether the pod has the named program attached (pinned).
func (st *PodStatus) HasProgram(name string) bool {
	return slices.ContainsFunc(st.Programs, func(p ProgramStatus) bool { return p.Name == name })
}

// Assess sets Defunct and Health from what Status read: the one line an operator reads
// first. Counters and drops are history, not state, so they do not change it.
func (st *PodStatus) Assess() {
	gone := 0
	for _, p := range st.Programs {
		if p.Defunct() {
			gone++
		}
	}
	st.Defunct = gone > 0
	var problems []string
	switch {
	case len(st.Programs) == 0 && st.Fallback != "":
		st.Health = "iptables fallback: " + st.Fallback
		return
	case st.Defunct:
		st.Health = fmt.Sprintf("defunct: %d of %d programs detached by the kernel (the pod's cgroup or netns is gone); divert gc removes the pins", gone, len(st.Programs))
		return
	case st.Inert:
		problems = append(problems, "inert: an attach or detach was interrupted and nothing is captured; run it again")
	}
	if st.Listeners != nil && *st.Listeners == 0 {
		problems = append(problems, fmt.Sprintf("no proxy listening on :%d: captured inbound connections are refused until it listens", st.Policy.InboundCapturePort))
	}
	if st.HasProgram("divert_connect4") != st.HasProgram("divert_connect6") {
		problems = append(problems, "connect4 and connect6 are not both attached: dual-stack sockets are decided differently; attach again")
	}
	if len(problems) == 0 {
		st.Health = "healthy"
		return
	}
	st.Health = "degraded: " + strings.Join(problems, "; ")
}

// countListeners counts the occupied entries of a pod's listener range: base and the
// listenerSlots after it. A lookup from user space answers a socket's cookie (value_size
// 8), or ENOENT for an empty entry.
func countListeners(m *ebpf.Map, base uint32) (int, error) {
	n := 0
	for slot := base; slot < base+listenerSlots; slot++ {
		var cookie uint64
		err := m.Lookup(slot, &cookie)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("read listener map entry %d: %w", slot, err)
		}
		n++
	}
	return n, nil
}
