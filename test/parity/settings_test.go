package parity

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// Owner groups, excluded interfaces (-c) and KubeVirt interfaces (-k), three ways. The pod
// has a second interface, net1, to the remote netns (a Multus network); the remote netns
// also stands in for a VM behind net1, whose connections to vmNet go through the pod.

// vmNet is where the "VM" behind net1 connects to; only the pod routes it (the remote
// netns sends it to the pod's net1 address), so only capture can answer.
var vmNet = netip.MustParsePrefix("192.0.2.0/24") // TEST-NET-1

type settingsScenario struct {
	name     string
	flags    []string
	uid, gid uint32
	groups   []uint32 // supplementary groups of the app
	thenGID  uint32   // the app (root) switches to this gid between socket() and connect()
	mptcp    bool
	// dst: "remote:80" (through eth0), "peer:80" (the remote netns's end of net1, through
	// net1), "pod:8080" or "net1:8080" (the pod's own addresses, inbound), "vm:80" (a vmNet
	// address, from the VM through net1).
	dst     string
	inbound bool
}

var settingsScenarios = []settingsScenario{
	// ISTIO_OUTBOUND_OWNER_GROUPS: xt_owner's --gid-owner, the socket file's group only.
	{name: "owner groups: a listed primary group is captured", flags: []string{"--istio-outbound-owner-groups", "2000,3000"}, uid: appUID, gid: 3000, dst: "remote:80"},
	{name: "owner groups: an unlisted group passes", flags: []string{"--istio-outbound-owner-groups", "2000,3000"}, uid: appUID, gid: appUID, dst: "remote:80"},
	{name: "owner groups: a listed supplementary group does not count", flags: []string{"--istio-outbound-owner-groups", "2000"}, uid: appUID, gid: appUID, groups: []uint32{2000}, dst: "remote:80"},
	{name: "owner groups: the uid's number is not a group", flags: []string{"--istio-outbound-owner-groups", "1000"}, uid: appUID, gid: 4000, dst: "remote:80"},
	{name: "owner groups: the socket's group, not the group at connect (in)", flags: []string{"--istio-outbound-owner-groups", "2000"}, uid: 0, gid: 2000, thenGID: 4000, dst: "remote:80"},
	{name: "owner groups: the socket's group, not the group at connect (out)", flags: []string{"--istio-outbound-owner-groups", "2000"}, uid: 0, gid: 4000, thenGID: 2000, dst: "remote:80"},
	{name: "owner groups: MPTCP subflows carry the app's group", flags: []string{"--istio-outbound-owner-groups", "2000"}, uid: appUID, gid: 2000, mptcp: true, dst: "remote:80"},
	{name: "owner groups: MPTCP, unlisted", flags: []string{"--istio-outbound-owner-groups", "2000"}, uid: appUID, gid: appUID, mptcp: true, dst: "remote:80"},
	{name: "owner groups: an empty list captures no group", flags: []string{"--istio-outbound-owner-groups="}, uid: appUID, gid: appUID, dst: "remote:80"},
	{name: "owner groups: the proxy's hairpin comes first", flags: []string{"--istio-outbound-owner-groups", "2000"}, uid: proxyUID, gid: proxyUID, dst: "pod:8080"},
	{name: "owner groups exclude: the group passes", flags: []string{"--istio-outbound-owner-groups-exclude", "2000"}, uid: appUID, gid: 2000, dst: "remote:80"},
	{name: "owner groups exclude: supplementary does not count", flags: []string{"--istio-outbound-owner-groups-exclude", "2000"}, uid: appUID, gid: appUID, groups: []uint32{2000}, dst: "remote:80"},
	{name: "owner groups exclude: the socket's group, not the group at connect", flags: []string{"--istio-outbound-owner-groups-exclude", "2000"}, uid: 0, gid: 2000, thenGID: 4000, dst: "remote:80"},

	// -c: a second interface is left alone both ways; eBPF cannot say which interface a
	// connection leaves by, so it refuses (and istio-iptables mode falls back).
	{name: "-c: outbound through net1 passes", flags: []string{"-c", "net1"}, uid: appUID, gid: appUID, dst: "peer:80"},
	{name: "-c: outbound through eth0 is captured", flags: []string{"-c", "net1"}, uid: appUID, gid: appUID, dst: "remote:80"},
	{name: "-c: inbound on net1 passes", flags: []string{"-c", "net1"}, dst: "net1:8080", inbound: true},
	{name: "-c: inbound on eth0 is captured", flags: []string{"-c", "net1"}, dst: "pod:8080", inbound: true},
	{name: "without -c: outbound through net1 is captured", uid: appUID, gid: appUID, dst: "peer:80"},
	{name: "without -c: inbound on net1 is captured", dst: "net1:8080", inbound: true},
	{name: "-c eth0: the proxy's own outbound is untouched still", flags: []string{"-c", "eth0"}, uid: proxyUID, gid: proxyUID, dst: "remote:80"},

	// -k: the VM's TCP through the pod goes to the outbound port.
	{name: "-k: the VM's connection goes to the proxy as outbound", flags: []string{"-k", "net1"}, dst: "vm:80", inbound: true},
	{name: "-k with -i: inside it too", flags: []string{"-k", "net1", "-i", "192.0.2.0/25"}, dst: "vm:80", inbound: true},
	{name: "-k with -i: outside it the VM's connection is not captured", flags: []string{"-k", "net1", "-i", "198.51.100.0/24"}, dst: "vm:80", inbound: true},
	{name: "-k: the VM's connection to the pod itself goes to the outbound port", flags: []string{"-k", "net1"}, dst: "net1:8080", inbound: true},
}

// settingsWorld is the parity world plus net1, and the route that makes the remote netns
// send vmNet through the pod.
type settingsWorld struct {
	*world
	net1 testpod.Link
}

func newSettingsWorld(t *testing.T) *settingsWorld {
	w := &settingsWorld{world: newWorld(t)}
	w.net1 = w.pod.AddLink(t, "net1")
	ns, err := netns.GetFromPath(w.pod.Net.NetNSPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	dst := &net.IPNet{IP: vmNet.Addr().AsSlice(), Mask: net.CIDRMask(vmNet.Bits(), 32)}
	if err := h.RouteAdd(&netlink.Route{Dst: dst, Gw: w.net1.Addr.AsSlice()}); err != nil {
		t.Fatalf("route %s through the pod: %v", vmNet, err)
	}
	return w
}

func (w *settingsWorld) resolve(t *testing.T, sym string) netip.AddrPort {
	host, port, _ := strings.Cut(sym, ":")
	addr := map[string]netip.Addr{"peer": w.net1.Peer, "net1": w.net1.Addr, "vm": vmNet.Addr().Next()}[host]
	if !addr.IsValid() {
		return w.world.resolve(t, sym)
	}
	return netip.MustParseAddrPort(fmt.Sprintf("%s:%s", addr, port))
}

// conn is the scenario as the model sees it: which interface it crosses is what routing
// and the remote netns's dialling make it.
func (w *settingsWorld) conn(t *testing.T, s settingsScenario) policy.Conn {
	dst := w.resolve(t, s.dst)
	host, _, _ := strings.Cut(s.dst, ":")
	local := dst.Addr() == w.pod.Addr || dst.Addr() == w.net1.Addr
	c := policy.Conn{UID: s.uid, GID: s.gid, Dst: dst, DstLocal: local, Iface: "eth0"}
	if s.inbound {
		c.Direction, c.UID, c.GID = policy.Inbound, 0, 0
	}
	if host == "peer" || host == "net1" || host == "vm" {
		c.Iface = "net1"
	}
	return c
}

// expected is what the client sees: world.expected, except that a VM's connection the pod
// does not capture finds nobody (the pod does not forward).
func (w *settingsWorld) expected(s settingsScenario, v policy.Verdict, c policy.Conn) outcome {
	if strings.HasPrefix(s.dst, "vm:") && v.Action == policy.Pass {
		return outcome{Landed: "error"}
	}
	return w.world.expected(v, c)
}

func TestSettingsParity(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			w := newSettingsWorld(t)
			b.setup(t, w.world)
			for _, s := range settingsScenarios {
				t.Run(s.name, func(t *testing.T) {
					cfg := w.config(t, scenario{flags: s.flags})
					c := w.conn(t, s)
					v := cfg.Decide(c)
					want := w.expected(s, v, c)
					if s.mptcp && !kernelHasMPTCP() {
						v, want = policy.Verdict{Reason: noVerdict}, outcome{Landed: "error: protocol not supported"}
					}
					if b.name == "ebpf" {
						if err := loader.CheckPolicy(cfg); err != nil {
							refused(t, w.world, cfg, err)
							return
						}
					}
					b.apply(t, w.world, cfg)
					target := testpod.Target{Dst: c.Dst, Shape: testpod.Shape{MPTCP: s.mptcp}, ThenGID: s.thenGID}
					var r testpod.Result
					switch {
					case s.inbound:
						r = w.pod.Net.Dial(t, target)[0]
					default:
						r = w.pod.DialGroups(t, s.uid, s.gid, s.groups, target)[0]
					}
					got := observed(r)
					if want.Landed == "error" && strings.HasPrefix(got.Landed, "error: ") {
						got.Landed = "error"
					}
					if got != want {
						t.Errorf("%s: uid %d gid %d groups %v -> %s via %s\n  model (%s): %s\n  %s: %s\n  (%s)",
							s.name, s.uid, s.gid, s.groups, c.Dst, c.Iface, v, want, b.name, got, w.health())
					}
					if b.after != nil {
						b.after(t, w.world, v)
					}
				})
			}
		})
	}
}

// refused checks the eBPF backend's answer to a setting it cannot express: the loader
// refuses it in one line that wraps ebpf.ErrNotSupported (istio-iptables mode's auto then
// falls back to iptables with that line), and a pod attached with it gets nothing.
func refused(t *testing.T, w *world, cfg *policy.Config, err error) {
	t.Helper()
	var pe *loader.PolicyError
	if !errors.As(err, &pe) || !errors.Is(err, ebpf.ErrNotSupported) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("CheckPolicy: want a one-line *loader.PolicyError wrapping ErrNotSupported, got %v", err)
	}
	opts := divertest.BPFFS(t)
	before, _ := os.ReadDir(opts.BPFFS) // the kernel's own maps.debug and progs.debug
	pod := loader.Pod{ID: "refused", Cgroup: w.pod.CgroupPath, NetNS: w.pod.NetNSPath}
	if aerr := loader.Attach(context.Background(), pod, cfg, opts); aerr == nil || aerr.Error() != err.Error() {
		t.Fatalf("Attach: want %q, got %v", err, aerr)
	}
	if after, _ := os.ReadDir(opts.BPFFS); len(after) != len(before) {
		t.Errorf("a refused attach left something in its bpffs: %v, was %v", after, before)
	}
	t.Logf("eBPF refuses: %v", err)
}
