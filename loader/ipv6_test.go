package loader_test

import (
	"context"
	"errors"
	"net/netip"
	"os/exec"
	"slices"
	"testing"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

var passthrough6 = netip.MustParseAddr("::6")

func ipv6Config(t *testing.T) *policy.Config {
	cfg := divertest.Config(t, "-x", "10.0.0.0/8")
	cfg.IPv6 = true
	cfg.OutboundExcludeCIDRs = append(cfg.OutboundExcludeCIDRs, netip.MustParsePrefix("fd00:10::/64"))
	return cfg
}

func hasAddr(t *testing.T, pod *testpod.Pod, a netip.Addr) bool {
	t.Helper()
	addrs, err := loader.LocalAddrs(pod.NetNSPath)
	if err != nil {
		t.Fatal(err)
	}
	return slices.Contains(addrs, a)
}

// A dual-stack pod attached with IPv6 capture: its addresses of both families are its own
// (and ::6, which Attach puts on lo for the proxy's inbound passthrough), status reads back
// the IPv6 setting and ranges beside the IPv4 ones and counts each family apart. Without
// IPv6 capture (istio writes no IPv6 rules for a dual-stack pod without dual stack) it is
// attached all the same, IPv4 captured and IPv6 left alone, and ::6 is not added. Detach
// leaves nothing attached (and ::6, as istio's cleanup does).
func TestAttachIPv6(t *testing.T) {
	pod := testpod.NewStack(t, testpod.DualStack)
	opts := divertest.BPFFS(t)
	lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
	if err := loader.Attach(context.Background(), lp, divertest.Config(t), opts); err != nil {
		t.Fatalf("a dual-stack pod without IPv6 capture: %v", err)
	}
	if st, err := loader.Status(pod.Name, opts); err != nil || st.Policy.IPv6 {
		t.Errorf("IPv6 captured without asking: %v", err)
	}
	if hasAddr(t, pod, passthrough6) {
		t.Errorf("an attach without IPv6 capture added %s", passthrough6)
	}

	if err := loader.Attach(context.Background(), lp, ipv6Config(t), opts); err != nil {
		t.Fatal(err)
	}
	att := &divertest.Attached{Pod: pod, Opts: opts}
	st, err := loader.Status(pod.Name, opts)
	if err != nil {
		t.Fatal(err)
	}
	p := st.Policy
	if !p.IPv6 || !slices.Equal(p.OutboundExcludeCIDRs, []string{"10.0.0.0/8", "fd00:10::/64"}) {
		t.Errorf("status policy: ipv6 %v, -x %v", p.IPv6, p.OutboundExcludeCIDRs)
	}
	for _, a := range []netip.Addr{pod.Addr, pod.Addr6, passthrough6} {
		if !slices.Contains(p.LocalAddrs, a) {
			t.Errorf("pod addresses %v lack %s", p.LocalAddrs, a)
		}
	}
	pod.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv6Unspecified(), 15001), "report", divertest.ProxyUID, divertest.ProxyUID)
	pod.Dial(t, divertest.AppUID, divertest.AppUID,
		testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs6[0], 80)},
		testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs6[1], 80)},
		testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[0], 80)})
	if st, err = loader.Status(pod.Name, opts); err != nil {
		t.Fatal(err)
	}
	if c := st.CountersByFamily; c["ipv6"]["included-cidr"] != 2 || c["ipv4"]["included-cidr"] != 1 || st.Counters["included-cidr"] != 3 {
		t.Errorf("counters %v by family %v: want 2 IPv6 and 1 IPv4 included-cidr", st.Counters, c)
	}
	att.NoDrops(t)

	if err := loader.Detach(pod.Name, opts); err != nil {
		t.Fatal(err)
	}
	divertest.AssertNothingAttached(t, pod, opts)
	if !hasAddr(t, pod, passthrough6) {
		t.Errorf("detach took %s away", passthrough6)
	}
}

// An attach that fails takes away the ::6 it added, and leaves one that was there before.
func TestAttachIPv6FailureRestoresPassthrough(t *testing.T) {
	injected := errors.New("injected failure")
	loader.SetTestHookBeforeCommit(func() error { return injected })
	defer loader.SetTestHookBeforeCommit(nil)
	for _, had := range []bool{false, true} {
		pod := testpod.NewStack(t, testpod.IPv6Only)
		opts := divertest.BPFFS(t)
		if had {
			if out, err := nsexec.CombinedOutput(pod.NetNSPath, exec.Command("ip", "-6", "addr", "add", "::6/128", "dev", "lo")); err != nil {
				t.Fatalf("add ::6: %v %s", err, out)
			}
		}
		lp := loader.Pod{ID: pod.Name, Cgroup: pod.CgroupPath, NetNS: pod.NetNSPath}
		if err := loader.Attach(context.Background(), lp, ipv6Config(t), opts); !errors.Is(err, injected) {
			t.Fatalf("attach returned %v, want the injected failure", err)
		}
		divertest.AssertNothingAttached(t, pod, opts)
		if got := hasAddr(t, pod, passthrough6); got != had {
			t.Errorf("%s there before: %v, after the failed attach: %v", passthrough6, had, got)
		}
	}
}
