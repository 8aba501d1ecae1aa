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
// scenario, checks that the programs decided the model's verdict, once per connection
// (divertest.VerdictCheck): none when the model's reason is none (no rule decides it: IPv6 where
// istio writes no IPv6 rules, UDP other than DNS), as no program decides such a connection.
func ebpfBackend() backend {
	var att *divertest.Attached // the last world's, for drops
	return backend{
		name: "ebpf",
		setup: func(t *testing.T, w *world) {
			att = divertest.Attach(t, w.pod, divertest.BPFFS(t), divertest.Config(t))
			w.ebpf, w.verdicts = att, divertest.NewVerdictCheck(t, att)
		},
		drops: func(t *testing.T) map[maps.Drop]uint64 { return att.Drops(t) },
		apply: func(t *testing.T, w *world, cfg *policy.Config) {
			divertest.Attach(t, w.pod, w.ebpf.Opts, cfg) // updates in place
			w.verdicts.Begin(t, cfg)
		},
		after: func(t *testing.T, w *world, v policy.Verdict) {
			w.verdicts.Check(t, decisionsOf(v), "ebpf")
		},
	}
}

// decisionsOf is what the programs must decide for a connection the model gave v: one
// decision under its reason, or none where no program decides (ReasonNone: no rule, as
// IPv6 where istio writes no IPv6 rules; noVerdict: the kernel refused it first).
func decisionsOf(v policy.Verdict) []policy.Reason {
	if v.Reason == policy.ReasonNone || v.Reason >= policy.NumReasons {
		return nil
	}
	return []policy.Reason{v.Reason}
}
