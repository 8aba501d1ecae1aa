package parity

import (
	"context"
	"testing"

	"github.com/meshdivert/divert/iptables"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
)

func backends() []backend {
	return []backend{iptablesBackend(iptables.BackendNFT), iptablesBackend(iptables.BackendLegacy), ebpfBackend()}
}

// iptablesBackend applies istio's rules with the given iptables flavour: the oracle.
func iptablesBackend(flavour iptables.Backend) backend {
	opts := iptables.Options{Backend: flavour}
	return backend{
		name:  "iptables-" + flavour.String(),
		setup: func(t *testing.T, w *world) {},
		apply: func(t *testing.T, w *world, cfg *policy.Config) {
			if _, err := opts.Apply(context.Background(), w.pod.NetNSPath, cfg); err != nil {
				t.Fatalf("apply iptables rules: %v", err)
			}
		},
	}
}

// ebpfBackend attaches divert (updating in place between scenarios) and, after each
// scenario, checks that the kernel counted exactly one verdict, under the model's reason;
// or none when the model's reason is none (no rule decides it: IPv6 where istio writes no
// IPv6 rules, UDP other than DNS), as no program decides such a connection.
func ebpfBackend() backend {
	var att *divertest.Attached
	var before map[policy.Reason]uint64
	return backend{
		name: "ebpf",
		setup: func(t *testing.T, w *world) {
			att = divertest.Attach(t, w.pod, divertest.BPFFS(t), divertest.Config(t))
			w.ebpf = att
		},
		drops: func(t *testing.T) map[maps.Drop]uint64 { return att.Drops(t) },
		apply: func(t *testing.T, w *world, cfg *policy.Config) {
			divertest.Attach(t, w.pod, att.Opts, cfg) // updates in place
			before = att.Counters(t)
		},
		after: func(t *testing.T, w *world, v policy.Verdict) {
			after := att.Counters(t)
			for _, r := range policy.Reasons() {
				want := before[r]
				// ReasonNone: no program decided it (the kernel refused it first).
				if r == v.Reason && r != policy.ReasonNone {
					want++
				}
				if after[r] != want {
					t.Errorf("counter %s went from %d to %d; the model decided %s", r, before[r], after[r], v.Reason)
				}
			}
		},
	}
}
