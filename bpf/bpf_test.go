package bpf_test

import (
	"fmt"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/policy"
)

// The C enum and policy.Reason must agree: counters are indexed by one and named by the other.
func TestReasonsMatchPolicy(t *testing.T) {
	pairs := map[bpf.DivertReason]policy.Reason{
		bpf.DivertReasonREASON_NONE:                   policy.ReasonNone,
		bpf.DivertReasonREASON_EXCLUDED_OUTBOUND_PORT: policy.ReasonExcludedOutboundPort,
		bpf.DivertReasonREASON_INBOUND_PASSTHROUGH:    policy.ReasonInboundPassthrough,
		bpf.DivertReasonREASON_PROXY_HAIRPIN:          policy.ReasonProxyHairpin,
		bpf.DivertReasonREASON_LOCAL_DESTINATION:      policy.ReasonLocalDestination,
		bpf.DivertReasonREASON_PROXY_UID:              policy.ReasonProxyUID,
		bpf.DivertReasonREASON_PROXY_GID:              policy.ReasonProxyGID,
		bpf.DivertReasonREASON_LOCALHOST:              policy.ReasonLocalhost,
		bpf.DivertReasonREASON_EXCLUDED_CIDR:          policy.ReasonExcludedCIDR,
		bpf.DivertReasonREASON_INCLUDED_OUTBOUND_PORT: policy.ReasonIncludedOutboundPort,
		bpf.DivertReasonREASON_INCLUDED_CIDR:          policy.ReasonIncludedCIDR,
		bpf.DivertReasonREASON_NOT_INCLUDED:           policy.ReasonNotIncluded,
		bpf.DivertReasonREASON_INBOUND_TUNNEL_PORT:    policy.ReasonInboundTunnelPort,
		bpf.DivertReasonREASON_INBOUND_EXCLUDED_PORT:  policy.ReasonInboundExcludedPort,
		bpf.DivertReasonREASON_INBOUND_INCLUDED_PORT:  policy.ReasonInboundIncludedPort,
		bpf.DivertReasonREASON_INBOUND_NOT_INCLUDED:   policy.ReasonInboundNotIncluded,
		bpf.DivertReasonREASON_DNS_CAPTURED:           policy.ReasonDNSCaptured,
		bpf.DivertReasonREASON_DNS_NOT_CAPTURED:       policy.ReasonDNSNotCaptured,

		bpf.DivertReasonREASON_OWNER_GROUP_NOT_INCLUDED:       policy.ReasonOwnerGroupNotIncluded,
		bpf.DivertReasonREASON_OWNER_GROUP_EXCLUDED:           policy.ReasonOwnerGroupExcluded,
		bpf.DivertReasonREASON_EXCLUDED_INTERFACE:             policy.ReasonExcludedInterface,
		bpf.DivertReasonREASON_VIRTUAL_INTERFACE:              policy.ReasonVirtualInterface,
		bpf.DivertReasonREASON_VIRTUAL_INTERFACE_NOT_INCLUDED: policy.ReasonVirtualInterfaceNotIncluded,
		bpf.DivertReasonNUM_REASONS:                           policy.NumReasons,
	}
	for c, g := range pairs {
		if uint32(c) != uint32(g) {
			t.Errorf("C reason %d != policy reason %s (%d)", c, g, g)
		}
	}
	if len(pairs) != int(policy.NumReasons)+1 {
		t.Errorf("%d reasons paired, policy has %d: add the new ones to both sides", len(pairs)-1, policy.NumReasons)
	}
}

// The counters map must have a slot for every reason, in each family.
func TestCountersHoldEveryReason(t *testing.T) {
	spec, err := bpf.LoadDivert()
	if err != nil {
		t.Fatal(err)
	}
	// A family's counters take half the map each (maps.CountersByFamily).
	if n := spec.Maps["counters"].MaxEntries; n%2 != 0 || n/2 < uint32(policy.NumReasons) {
		t.Fatalf("counters map has %d entries, need two halves of %d", n, policy.NumReasons)
	}
}

// Sockmaps must be declared by size, not by BTF type: the kernel refuses BTF on them, and
// cilium/ebpf's retry without BTF comes after the kernel freed the refused map, which waits
// for an RCU grace period (tens of milliseconds on every attach).
func TestSockmapsHaveNoBTF(t *testing.T) {
	spec, err := bpf.LoadDivert()
	if err != nil {
		t.Fatal(err)
	}
	for name, m := range spec.Maps {
		if m.Type != ebpf.SockMap && m.Type != ebpf.SockHash {
			continue
		}
		if m.Key != nil || m.Value != nil {
			t.Errorf("map %s: declare key_size and value_size instead of __type(key/value, ...)", name)
		}
	}
}

// sk_lookup's own object (sk_lookup.c) holds the same sk_lookup programs as divert.c: both
// compile sk_lookup.h, and a pod of the node layout runs the small object's copy.
func TestSkLookupObjectMatchesDivert(t *testing.T) {
	big, err := bpf.LoadDivert()
	if err != nil {
		t.Fatal(err)
	}
	small, err := bpf.LoadSkLookup()
	if err != nil {
		t.Fatal(err)
	}
	if len(small.Programs) != 2 {
		t.Errorf("sk_lookup object holds %d programs, want its two", len(small.Programs))
	}
	for _, name := range []string{bpf.SkLookupProgDivertSkLookup, bpf.SkLookupProgDivertSkLookupStatic} {
		s, b := small.Programs[name], big.Programs[name]
		if s == nil || b == nil {
			t.Fatalf("%s: in sk_lookup's object %v, in divert's %v", name, s != nil, b != nil)
		}
		if got, want := fmt.Sprint(s.Instructions), fmt.Sprint(b.Instructions); got != want {
			t.Errorf("%s: instructions differ between the objects:\n%s\nvs divert's\n%s", name, got, want)
		}
		// The maps it uses are the node's, made from divert's definitions.
		for _, ins := range s.Instructions {
			ms := small.Maps[ins.Reference()]
			if ms == nil || ms.Name == ".rodata" {
				continue
			}
			if bm := big.Maps[ms.Name]; bm == nil || mapShape(ms) != mapShape(bm) {
				t.Errorf("%s: map %s is %s, divert's %s", name, ms.Name, mapShape(ms), mapShape(bm))
			}
		}
	}
}

func mapShape(m *ebpf.MapSpec) string {
	if m == nil {
		return "missing"
	}
	s := fmt.Sprintf("%s key %d value %d max %d flags %#x", m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
	if m.InnerMap != nil {
		s += " of (" + mapShape(m.InnerMap) + ")"
	}
	return s
}
