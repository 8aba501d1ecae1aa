package parity

import (
	"net/netip"
	"testing"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/test/testpod"
)

// Destinations and socket shapes the kernel treats specially (issue 16 item 3, issue 22
// item 5): each row is run by TestOutboundParity like the main table. The outcome is the
// listener that accepted, the original destination the proxy read, or the error connect
// returned. What still differs is in TestDocumentedDifferences and docs/semantics.md.
var edgeScenarios = []scenario{
	// The rest of 127/8: all local; 127.255.255.255 is lo's broadcast address.
	{name: "app to 127.255.255.254 passes", uid: appUID, gid: appUID, dst: "127.255.255.254:8080"},
	{name: "proxy to 127.255.255.254 hairpins", uid: proxyUID, gid: proxyUID, dst: "127.255.255.254:8080"},
	{name: "app to lo's broadcast 127.255.255.255 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "127.255.255.255:8080"},
	{name: "proxy to 127.255.255.255: ENETUNREACH, not a hairpin", uid: proxyUID, gid: proxyUID, dst: "127.255.255.255:8080"},
	{name: "app to 127.255.255.255 with -i 127.0.0.0/8: ENETUNREACH", flags: []string{"-i", "127.0.0.0/8"}, uid: appUID, gid: appUID, dst: "127.255.255.255:8080"},
	// The pod's own address, dialled from its own address.
	{name: "app bound to the pod IP to the pod IP passes", uid: appUID, gid: appUID, src: "{pod}", dst: "pod:8080"},
	{name: "proxy bound to the pod IP to the pod IP hairpins", uid: proxyUID, gid: proxyUID, src: "{pod}", dst: "pod:8080"},
	// Redirected from the pod IP to 127.0.0.1: the proxy must still read the destination.
	{name: "app bound to the pod IP to a remote is captured", uid: appUID, gid: appUID, src: "{pod}", dst: "remote:80"},
	{name: "TFO: app bound to the pod IP to a remote is captured", uid: appUID, gid: appUID, src: "{pod}", dst: "remote:80", shape: testpod.Shape{FastOpen: true}},
	// Broadcast and multicast routes: tcp_v4_connect's ENETUNREACH, before any rule.
	{name: "app to 255.255.255.255 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "255.255.255.255:80"},
	{name: "proxy to 255.255.255.255 is the kernel's ENETUNREACH", uid: proxyUID, gid: proxyUID, dst: "255.255.255.255:80"},
	{name: "app to multicast 224.0.0.1 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "224.0.0.1:80"},
	{name: "app to multicast 239.255.255.250 with -q is the kernel's ENETUNREACH", flags: []string{"-i", "", "-q", "1900"}, uid: appUID, gid: appUID, dst: "239.255.255.250:1900"},
	{name: "v4-mapped socket: app to 255.255.255.255 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "255.255.255.255:80", v4mapped: true},
	// 0/8 is unicast since Linux 5.3 (no route to it here: captured, the proxy reads it).
	{name: "app to 0.1.2.3 is captured", uid: appUID, gid: appUID, dst: "0.1.2.3:80"},
	// A loopback source cannot leave the pod: the route lookup's EINVAL.
	{name: "app bound to 127.0.0.1 to a remote is the kernel's EINVAL", uid: appUID, gid: appUID, src: "127.0.0.1", dst: "remote:80"},
	{name: "proxy bound to 127.0.0.1 to a remote is the kernel's EINVAL", uid: proxyUID, gid: proxyUID, src: "127.0.0.1", dst: "remote:80"},
	{name: "app bound to 127.0.0.6 to a remote is the kernel's EINVAL", uid: appUID, gid: appUID, src: "127.0.0.6", dst: "remote:80"},
	{name: "app bound to 127.0.0.1 to 127.0.0.2 passes", uid: appUID, gid: appUID, src: "127.0.0.1", dst: "127.0.0.2:8080"},
	{name: "app bound to 127.0.0.1 to the pod IP passes", uid: appUID, gid: appUID, src: "127.0.0.1", dst: "pod:8080"},
	// SO_BINDTODEVICE lo: the SYN leaves through lo whatever its destination, and nothing
	// there answers an address outside 127/8, not even the proxy after iptables' hairpin.
	{name: "app bound to lo to a remote times out", uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{BindDevice: "lo"}},
	{name: "proxy bound to lo to a remote times out, no hairpin", uid: proxyUID, gid: proxyUID, dst: "remote:80", shape: testpod.Shape{BindDevice: "lo"}},
	{name: "app bound to lo to 127.0.0.2 passes", uid: appUID, gid: appUID, dst: "127.0.0.2:8080", shape: testpod.Shape{BindDevice: "lo"}},
	{name: "app bound to lo to the pod IP times out", uid: appUID, gid: appUID, dst: "pod:8080", shape: testpod.Shape{BindDevice: "lo"}},
	{name: "app bound to lo with -i 127.0.0.0/8 to a remote times out", flags: []string{"-i", "127.0.0.0/8"}, uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{BindDevice: "lo"}},
	// SO_BINDTODEVICE eth0: a captured connection, redirected to 127.0.0.1, cannot leave
	// through eth0 (under iptables its SYN is NATed there and dropped, under divert it is
	// sent out eth0 to 127.0.0.1): both time out. What passes goes out as usual.
	{name: "app bound to eth0 to a remote is captured and goes nowhere", uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{BindDevice: "eth0"}},
	{name: "proxy bound to eth0 to a remote passes", uid: proxyUID, gid: proxyUID, dst: "remote:80", shape: testpod.Shape{BindDevice: "eth0"}},
	{name: "app bound to eth0 to an excluded port passes", flags: []string{"-o", "80"}, uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{BindDevice: "eth0"}},
	// TCP Fast Open: sendto(MSG_FASTOPEN) connects through the same hook. With a cookie
	// (fetched by a first connection) the SYN carries it and the server's socket is
	// created from the SYN alone; captured, that is a documented difference (below).
	{name: "TFO: app to remote is captured", uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{FastOpen: true}},
	{name: "TFO: proxy to remote passes", uid: proxyUID, gid: proxyUID, dst: "remote:80", shape: testpod.Shape{FastOpen: true}},
	{name: "TFO: excluded outbound port passes", flags: []string{"-o", "80"}, uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{FastOpen: true}},
	{name: "TFO with a cookie: excluded outbound port passes", flags: []string{"-o", "8080"}, uid: appUID, gid: appUID, dst: "pod:8080", shape: testpod.Shape{FastOpen: true}, tfoCookie: true},
	{name: "TFO with a cookie: app to own pod IP passes", uid: appUID, gid: appUID, dst: "pod:8080", shape: testpod.Shape{FastOpen: true}, tfoCookie: true},
	// io_uring's IORING_OP_CONNECT, from the submitting task and from an io-wq worker: the
	// same hook, with the submitter's ids.
	{name: "io_uring: app to remote is captured", uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{IOURing: true}},
	{name: "io_uring: proxy to remote passes", uid: proxyUID, gid: proxyUID, dst: "remote:80", shape: testpod.Shape{IOURing: true}},
	{name: "io_uring on a worker: app to remote is captured", uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{IOURingAsync: true}},
	{name: "io_uring on a worker: proxy to remote passes", uid: proxyUID, gid: proxyUID, dst: "remote:80", shape: testpod.Shape{IOURingAsync: true}},
	{name: "io_uring on a worker: proxy gid alone passes", uid: appUID, gid: proxyUID, dst: "remote:80", shape: testpod.Shape{IOURingAsync: true}},
	{name: "io_uring: app to 255.255.255.255 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "255.255.255.255:80", shape: testpod.Shape{IOURing: true}},
	// Whose socket it is (issue 22 item 3): xt_owner matches the socket file's fsuid and
	// fsgid, the effective ids at socket(), whoever connects it. uid and gid are those ids
	// (the model's); the client switches ids between socket() and connect().
	{name: "socket made by the app, connected as the proxy, is captured", uid: appUID, gid: appUID, dst: "remote:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(appUID, appUID), Connect: testpod.Same(proxyUID, proxyUID)}}},
	{name: "socket made by the proxy, connected as the app, passes", uid: proxyUID, gid: proxyUID, dst: "remote:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(proxyUID, proxyUID), Connect: testpod.Same(appUID, appUID)}}},
	{name: "socket made by the proxy, connected as the app, to the pod IP hairpins", uid: proxyUID, gid: proxyUID, dst: "pod:8080",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(proxyUID, proxyUID), Connect: testpod.Same(appUID, appUID)}}},
	{name: "real uid 1337, effective 1000 (setuid to the app): captured", uid: appUID, gid: appUID, dst: "remote:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: creds(proxyUID, appUID, proxyUID, appUID), Connect: creds(proxyUID, appUID, proxyUID, appUID)}}},
	{name: "real uid 1000, effective 1337 (setuid to the proxy): passes", uid: proxyUID, gid: proxyUID, dst: "remote:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: creds(appUID, proxyUID, appUID, proxyUID), Connect: creds(appUID, proxyUID, appUID, proxyUID)}}},
	{name: "socket made with the proxy gid, connected with the app's, passes", uid: appUID, gid: proxyUID, dst: "remote:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(appUID, proxyUID), Connect: testpod.Same(appUID, appUID)}}},
	{name: "effective gid 1337, real 1000: passes", uid: appUID, gid: proxyUID, dst: "remote:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: creds(appUID, appUID, appUID, proxyUID), Connect: creds(appUID, appUID, appUID, proxyUID)}}},
	{name: "io_uring on a worker: socket made by the app, connected as the proxy, is captured", uid: appUID, gid: appUID, dst: "remote:80",
		shape: testpod.Shape{IOURingAsync: true, IDs: &testpod.IDSwitch{Socket: testpod.Same(appUID, appUID), Connect: testpod.Same(proxyUID, proxyUID)}}},
}

// creds are real and effective uid, real and effective gid.
func creds(ruid, euid, rgid, egid uint32) testpod.Creds {
	return testpod.Creds{RUID: ruid, EUID: euid, RGID: rgid, EGID: egid}
}

// runAs is who the client process is started as: root when it switches ids itself.
func (s scenario) runAs() (uid, gid uint32) {
	if s.shape.IDs != nil {
		return 0, 0
	}
	return s.uid, s.gid
}

// podBroadcast is the broadcast address of the pod's /24 (testpod's addressing).
func (w *world) podBroadcast() netip.Addr {
	if !w.pod.Addr.Is4() {
		return netip.Addr{} // an IPv6-only pod
	}
	b := w.pod.Addr.As4()
	b[3] = 255
	return netip.AddrFrom4(b)
}

// TestDocumentedDifferences pins what each backend does where they still differ, each
// listed in docs/semantics.md with its reason: a change of either side shows here.
func TestDocumentedDifferences(t *testing.T) {
	unreadable := "unreadable: no such file or directory"
	differences := []difference{
		// The pod's subnet broadcast is a broadcast route (ENETUNREACH), which connect4
		// cannot look up.
		{scenario{name: "app to the pod's subnet broadcast", uid: appUID, gid: appUID, dst: "podbrd:80"},
			outcome{Landed: "error: network is unreachable"}, outcome{Landed: "proxy:15001", Orig: "{podbrd}:80"}},
		// conntrack answers SO_ORIGINAL_DST for any tracked connection; divert only for
		// redirected ones.
		{scenario{name: "app straight to the proxy's 127.0.0.1:15001", uid: appUID, gid: appUID, dst: "127.0.0.1:15001"},
			outcome{Landed: "proxy:15001", Orig: "127.0.0.1:15001"}, outcome{Landed: "proxy:15001", Orig: unreadable}},
		// With a TFO cookie from a proxy whose listeners give them out, the SYN alone makes
		// the proxy's socket, and it has no room for divert's option (counted as
		// orig-dst-unsent).
		{scenario{name: "TFO with a cookie: app to remote is captured", uid: appUID, gid: appUID, dst: "remote:80", shape: testpod.Shape{FastOpen: true}, tfoCookie: true},
			outcome{Landed: "proxy:15001", Orig: "{remote}:80"}, outcome{Landed: "proxy:15001", Orig: unreadable}},
		{scenario{name: "TFO with a cookie: proxy to own pod IP hairpins", uid: proxyUID, gid: proxyUID, dst: "pod:8080", shape: testpod.Shape{FastOpen: true}, tfoCookie: true},
			outcome{Landed: "proxy:15006", Orig: "{pod}:8080"}, outcome{Landed: "proxy:15006", Orig: unreadable}},
	}
	documentedDifferences(t, newWorld, differences)
}

// documentedDifferences runs each difference in a world made by newW, per backend.
func documentedDifferences(t *testing.T, newW func(*testing.T) *world, differences []difference) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			w := newW(t)
			b.setup(t, w)
			for _, d := range differences {
				t.Run(d.s.name, func(t *testing.T) {
					b.apply(t, w, w.config(t, d.s))
					want := d.iptables
					if b.name == "ebpf" {
						want = d.ebpf
					}
					want.Orig = w.expand(want.Orig)
					c := w.conn(t, d.s)
					uid, gid := d.s.runAs()
					if d.s.tfoCookie {
						w.pod.Dial(t, uid, gid, d.s.target(c))
					}
					var before map[maps.Drop]uint64
					if b.drops != nil {
						before = b.drops(t)
					}
					if got := observed(w.pod.Dial(t, uid, gid, d.s.target(c))[0]); got != want {
						t.Errorf("%s: %s, documented %s (docs/semantics.md)", d.s.name, got, want)
					}
					// The option that did not fit is a counted drop, never a silent one.
					if b.drops != nil && d.s.tfoCookie && b.drops(t)[maps.DropOrigDstUnsent] <= before[maps.DropOrigDstUnsent] {
						t.Errorf("%s: no orig-dst-unsent drop counted", d.s.name)
					}
				})
			}
		})
	}
}

type difference struct {
	s        scenario
	iptables outcome
	ebpf     outcome
}
