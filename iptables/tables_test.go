package iptables

import (
	"context"
	"slices"
	"testing"

	"github.com/meshdivert/divert/policy"
)

// A netns without a table of either backend needs no iptables-save to know istio's rules
// are not there (anyTables, what an eBPF init container checks first); one table of any
// backend and family, even without istio's chains, sends Installed to the dumps, which find
// istio's rules where they are.
func TestAnyTables(t *testing.T) {
	ctx := context.Background()
	ns := newNetNS(t)
	if anyTables(ns) {
		t.Error("a fresh netns has tables")
	}
	if got, err := Installed(ctx, ns); err != nil || len(got) != 0 {
		t.Errorf("Installed in a fresh netns: %v %v, want none", got, err)
	}
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		for _, f := range []policy.Family{policy.IPv4, policy.IPv6} {
			ns := newNetNS(t)
			restore(t, b, ns, "*filter\n:DVT-OTHER - [0:0]\nCOMMIT\n", f)
			if !anyTables(ns) {
				t.Errorf("%s %s filter table not seen", b, f)
			}
			if got, err := Installed(ctx, ns); err != nil || len(got) != 0 {
				t.Errorf("Installed beside a %s %s table without istio's chains: %v %v, want none", b, f, got, err)
			}
		}
		ns := newNetNS(t)
		if _, err := (Options{Backend: b}).Apply(ctx, ns, caseConfig(t, nil)); err != nil {
			t.Fatal(err)
		}
		if got, err := Installed(ctx, ns); err != nil || !slices.Equal(got, []Backend{b}) {
			t.Errorf("Installed after a %s apply: %v %v, want [%s]", b, got, err, b)
		}
		if err := (Options{Backend: b}).Cleanup(ctx, ns); err != nil {
			t.Fatal(err)
		}
	}
}
