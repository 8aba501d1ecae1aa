package security

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// The escapes of issue 22 that docs/security.md lists under "What divert does not
// promise": each test runs the trick in a pod captured by istio's rules (iptables-nft and
// iptables-legacy) and by divert, and asserts where the trick's connection landed — the
// proxy (with the original destination) or the destination itself — and that a plain
// connection of the same process landed on the proxy.

// capture is one way of capturing the pod.
type capture struct {
	name   string
	ebpf   bool
	iptool string // the iptables binary of this flavour, for the tests' own filter rules
	apply  func(t *testing.T, pod *testpod.Pod)
}

func captures() []capture {
	rules := func(b iptables.Backend) func(*testing.T, *testpod.Pod) {
		return func(t *testing.T, pod *testpod.Pod) {
			if _, err := (iptables.Options{Backend: b}).Apply(context.Background(), pod.NetNSPath, divertest.Config(t)); err != nil {
				t.Fatalf("apply istio's rules: %v", err)
			}
		}
	}
	return []capture{
		{name: "iptables-nft", iptool: "iptables-nft", apply: rules(iptables.BackendNFT)},
		{name: "iptables-legacy", iptool: "iptables-legacy", apply: rules(iptables.BackendLegacy)},
		{name: "ebpf", ebpf: true, iptool: "iptables", apply: func(t *testing.T, pod *testpod.Pod) {
			divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
		}},
	}
}

// remotePort is where the app connects: a server in the remote netns that names itself.
const remotePort = 80

// escapeWorld is a pod with a proxy on 15001/15006 (uid 1337), a remote server, and the
// capture applied.
func escapeWorld(t *testing.T, c capture) (*testpod.Pod, netip.AddrPort) {
	pod := testpod.New(t)
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: divertest.ProxyUID, GID: divertest.ProxyUID,
		Listen: []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:15001"), netip.MustParseAddrPort("0.0.0.0:15006")}})
	dst := netip.AddrPortFrom(testpod.PrimaryAddr, remotePort)
	pod.Net.Server(t, "remote", netip.AddrPortFrom(netip.IPv4Unspecified(), remotePort))
	c.apply(t, pod)
	return pod, dst
}

// landedOn names where a connection to dst landed: "proxy" (which read dst as the original
// destination), "remote", or what went wrong.
func landedOn(l *landing, dst netip.AddrPort) string {
	switch {
	case l == nil:
		return "no connection made"
	case l.Err != "":
		return "error: " + l.Err
	case l.Hop.Who == "proxy" && l.Hop.Orig == dst.String():
		return "proxy"
	case l.Hop.Who == "remote":
		return "remote"
	}
	return "unexpected listener " + l.Hop.Who + " (original destination " + or(l.Hop.Orig, l.Hop.OrigErr) + ")"
}

// checkLanded asserts the process's own socket landed on the proxy (the pod is captured)
// and the trick's connection where want says.
func checkLanded(t *testing.T, r report, dst netip.AddrPort, want string) {
	t.Helper()
	t.Logf("own socket: %s %+v; trick: %s %+v", landedOn(r.Own, dst), r.Own, landedOn(r.Trick, dst), r.Trick)
	if got := landedOn(r.Own, dst); got != "proxy" {
		t.Errorf("the helper's own socket landed on %s, want the proxy: the pod is not captured", got)
	}
	if got := landedOn(r.Trick, dst); got != want {
		t.Errorf("the trick's connection landed on %s, want %s", got, want)
	}
}

// stepErr is what stopped the helper's step named prefix..., "" if it worked.
func stepErr(t *testing.T, r report, prefix string) string {
	t.Helper()
	for _, s := range r.Steps {
		if strings.HasPrefix(s.What, prefix) {
			return s.Err
		}
	}
	t.Fatalf("the helper did not try %q: %+v", prefix, r.Steps)
	return ""
}

// TestPassedSocketEscapes (issue 22, item 1): a process in the pod's netns but outside its
// cgroup (here the test itself) makes a TCP socket and passes it over SCM_RIGHTS to the
// app, in the pod's cgroup, which connects it. istio's nat rules see every packet of the
// netns: the proxy. divert's connect hook runs for the socket's cgroup, not the caller's:
// the destination. The app's own socket lands on the proxy under both.
func TestPassedSocketEscapes(t *testing.T) {
	for _, c := range captures() {
		t.Run(c.name, func(t *testing.T) {
			pod, dst := escapeWorld(t, c)
			// The premise: the test process, which makes the socket, is not in the pod's cgroup.
			if self := selfCgroup(); self == "" || strings.HasSuffix(pod.CgroupPath, self) {
				t.Fatalf("the test runs in cgroup %q, the pod's is %s", self, pod.CgroupPath)
			}
			ours, theirs := socketPair(t)
			r := escape(t, pod, order{Mode: "passed-socket", Dst: dst.String()}, []*os.File{theirs}, 0, func() error {
				var fd int
				err := nsexec.Do(pod.NetNSPath, func() error { // this thread's netns, the test's cgroup
					var err error
					fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
					return err
				})
				if err != nil {
					return err
				}
				defer unix.Close(fd)
				_, _, err = ours.WriteMsgUnix([]byte{0}, unix.UnixRights(fd), nil)
				return err
			})
			if err := stepErr(t, r, "receive"); err != "" {
				t.Fatalf("the app got no socket: %s", err)
			}
			want := "proxy"
			if c.ebpf {
				want = "remote"
			}
			checkLanded(t, r, dst, want)
		})
	}
}

// TestCgroupMoveEscapes (issue 22, item 2, first shape): root in the pod sees the host's
// cgroupfs, writable (a privileged container, or the host's /sys/fs/cgroup mounted in), and
// moves itself to a cgroup outside the pod. istio's rules still capture its connections;
// divert's programs, attached to the pod's cgroup, no longer run for them.
func TestCgroupMoveEscapes(t *testing.T) {
	for _, c := range captures() {
		t.Run(c.name, func(t *testing.T) {
			pod, dst := escapeWorld(t, c)
			outside := pod.Net.CgroupPath // a cgroup of the test's, never the pod's
			r := escape(t, pod, order{Mode: "move", Dst: dst.String(), Cgroup: outside}, nil, 0, nil)
			if err := stepErr(t, r, "move itself"); err != "" {
				t.Fatalf("root with the host's cgroupfs could not leave the pod's cgroup: %s", err)
			}
			if r.Self == "" || !strings.HasSuffix(outside, r.Self) {
				t.Fatalf("the helper is in %q after the move, want %s", r.Self, outside)
			}
			want := "proxy"
			if c.ebpf {
				want = "remote"
			}
			checkLanded(t, r, dst, want)
		})
	}
}

// TestCgroupNamespaceHoldsTheMove (issue 22, item 2, second shape): root in the pod with a
// cgroup namespace rooted at the pod's cgroup and a fresh cgroup2 mount, as container
// runtimes give containers on cgroup v2. The mount's root is the pod's cgroup: the only
// cgroups it shows are the pod's own, and a move to one of them (root may make one) keeps
// the process below the pod's cgroup, where the pod's programs still run: every capture
// lands on the proxy. The host's cgroupfs is left visible here to show what holds if a
// container does see it: the kernel refuses a move out of the cgroup namespace's root
// (ENOENT) only when the host mounted cgroup2 with nsdelegate (systemd does on unified
// hosts); without it the move works, and so does the escape of TestCgroupMoveEscapes.
func TestCgroupNamespaceHoldsTheMove(t *testing.T) {
	nsdelegate := hostNSDelegate(t)
	for _, c := range captures() {
		t.Run(c.name, func(t *testing.T) {
			pod, dst := escapeWorld(t, c)
			outside := pod.Net.CgroupPath
			divertest.ChildCgroup(t, pod.CgroupPath, "escape") // as the pod's root could make it
			o := order{Mode: "cgroupns", Dst: dst.String(), Cgroup: outside, Mount: t.TempDir(), Child: "escape"}
			r := escape(t, pod, o, nil, unix.CLONE_NEWCGROUP|unix.CLONE_NEWNS, nil)
			if err := stepErr(t, r, "mount a fresh cgroup2"); err != "" {
				t.Fatalf("mount cgroup2 in the helper's namespaces: %s", err)
			}
			if !slices.Contains(r.Procs, r.Pid) {
				t.Errorf("the fresh cgroup2 mount's root holds %v, not the helper (%d): it is not the pod's cgroup", r.Procs, r.Pid)
			}
			if !slices.Equal(r.Visible, []string{"escape"}) {
				t.Errorf("the fresh cgroup2 mount shows %v, want only the pod's own escape", r.Visible)
			}
			switch err := stepErr(t, r, "move itself to "+outside); {
			case nsdelegate && !strings.Contains(err, unix.ENOENT.Error()):
				t.Errorf("moving out of the cgroup namespace with nsdelegate: %q, want the kernel's ENOENT", or(err, "it worked"))
			case !nsdelegate && err != "":
				t.Errorf("moving out of the cgroup namespace without nsdelegate failed (%s): the kernel changed", err)
			}
			if err := stepErr(t, r, "move itself to escape"); err != "" {
				t.Errorf("root could not move below its own cgroup: %s", err)
			}
			if r.Self != "/escape" {
				t.Errorf("the helper is in %q (in its cgroup namespace), want /escape", r.Self)
			}
			checkLanded(t, r, dst, "proxy")
		})
	}
}

// hostNSDelegate reports whether the host's cgroup2 is mounted with nsdelegate (a flag of
// the whole hierarchy, only settable from the initial namespaces).
func hostNSDelegate(t *testing.T) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if _, super, ok := strings.Cut(l, " - cgroup2 "); ok {
			nsd := slices.Contains(strings.Split(strings.Fields(super + " x")[1], ","), "nsdelegate")
			t.Logf("cgroup2 mounted with nsdelegate: %v (%s)", nsd, l)
			return nsd
		}
	}
	t.Fatal("no cgroup2 mount")
	return false
}

// TestRawSYNEscapes (issue 22, item 4): root in the pod with CAP_NET_RAW writes a
// handshake by hand on a raw socket (IP_HDRINCL, the pod's own address as source). No
// connect() is made, so divert's hooks never see it: it reaches the destination. istio's
// nat OUTPUT rules see the raw SYN as any other: conntrack tracks it as a new connection,
// REDIRECT sends it to 15001, the proxy accepts and reads the original destination.
func TestRawSYNEscapes(t *testing.T) {
	for _, c := range captures() {
		t.Run(c.name, func(t *testing.T) {
			pod, dst := escapeWorld(t, c)
			// The pod's kernel knows nothing of the hand-made connection and answers the
			// SYN-ACK with a RST: drop it, in the raw table so that conntrack never sees it
			// either (a filter rule works as well here).
			out, err := nsexec.CombinedOutput(pod.NetNSPath, exec.Command(c.iptool, "-w", "-t", "raw", "-A", "OUTPUT",
				"-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"))
			if err != nil {
				t.Fatalf("%s in the pod: %v %s", c.iptool, err, out)
			}
			src := netip.AddrPortFrom(pod.Addr, 47124)
			r := escape(t, pod, order{Mode: "raw-syn", Dst: dst.String(), Src: src.String()}, nil, 0, nil)
			want := "proxy"
			if c.ebpf {
				want = "remote"
			}
			checkLanded(t, r, dst, want)
		})
	}
}
