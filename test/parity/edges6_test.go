package parity

import (
	"testing"

	"github.com/meshdivert/divert/test/testpod"
)

// TestEdgeParityIPv6 runs edgeScenarios6 like TestOutboundParityIPv6, on its own so that
// the VM suite's -quick, which leaves that test out, still runs these in every guest; in
// the worlds that capture IPv6 only (without ip6tables rules no program decides IPv6, and
// the kernel refuses the same connects: the model's refused6 rows in policy show it).
func TestEdgeParityIPv6(t *testing.T) { outboundParity6(t, edgeScenarios6, true) }

// edgeScenarios6 are edgeScenarios in IPv6: the destinations and socket shapes the kernel treats specially, where ip6tables
// and the IPv6 kernel differ from IPv4 (docs/semantics.md): no broadcast; multicast is
// refused by tcp_v6_connect after the connect6 hook ran; a link-local destination needs
// an interface; a ::1 source is not refused by the route lookup.
var edgeScenarios6 = []scenario6{
	// Multicast: tcp_v6_connect's ENETUNREACH, whatever the rules.
	{scenario: scenario{name: "app to multicast ff02::1 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "[ff02::1]:80"}},
	{scenario: scenario{name: "proxy to multicast ff05::2 is the kernel's ENETUNREACH", uid: proxyUID, gid: proxyUID, dst: "[ff05::2]:80"}},
	{scenario: scenario{name: "app to multicast ff0e::1 with -q is the kernel's ENETUNREACH", flags: []string{"-i", "", "-q", "1900"}, uid: appUID, gid: appUID, dst: "[ff0e::1]:1900"}},
	{scenario: scenario{name: "dual-stack socket: app to multicast ff02::1 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "[ff02::1]:80", dual: true}},
	{scenario: scenario{name: "io_uring: app to multicast ff02::1 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "[ff02::1]:80", shape: testpod.Shape{IOURing: true}}},
	// A link-local destination without an interface: tcp_v6_connect's EINVAL.
	{scenario: scenario{name: "app to link-local fe80::1 is the kernel's EINVAL", uid: appUID, gid: appUID, dst: "[fe80::1]:80"}},
	{scenario: scenario{name: "proxy to link-local fe80::1 is the kernel's EINVAL", uid: proxyUID, gid: proxyUID, dst: "[fe80::1]:80"}},
	// The pod's own IPv6 address, dialled from its own address.
	{scenario: scenario{name: "app bound to the pod IP to the pod IP passes", uid: appUID, gid: appUID, src: "{pod6}", dst: "pod6:8080"}},
	{scenario: scenario{name: "proxy bound to the pod IP to the pod IP hairpins", uid: proxyUID, gid: proxyUID, src: "{pod6}", dst: "pod6:8080"}},
	// Redirected from the pod IP to ::1: the proxy must still read the destination.
	{scenario: scenario{name: "app bound to the pod IP to a remote is captured", uid: appUID, gid: appUID, src: "{pod6}", dst: "remote6:80"}},
	{scenario: scenario{name: "TFO: app bound to the pod IP to a remote is captured", uid: appUID, gid: appUID, src: "{pod6}", dst: "remote6:80", shape: testpod.Shape{FastOpen: true}}},
	// A loopback source to a remote.
	{scenario: scenario{name: "app bound to ::1 to a remote", uid: appUID, gid: appUID, src: "::1", dst: "remote6:80"}},
	{scenario: scenario{name: "proxy bound to ::1 to a remote", uid: proxyUID, gid: proxyUID, src: "::1", dst: "remote6:80"}},
	{scenario: scenario{name: "app bound to ::6 to a remote", uid: appUID, gid: appUID, src: "::6", dst: "remote6:80"}},
	{scenario: scenario{name: "app bound to ::1 to the pod IP passes", uid: appUID, gid: appUID, src: "::1", dst: "pod6:8080"}},
	// SO_BINDTODEVICE lo.
	{scenario: scenario{name: "app bound to lo to a remote", uid: appUID, gid: appUID, dst: "remote6:80", shape: testpod.Shape{BindDevice: "lo"}}},
	{scenario: scenario{name: "proxy bound to lo to a remote", uid: proxyUID, gid: proxyUID, dst: "remote6:80", shape: testpod.Shape{BindDevice: "lo"}}},
	{scenario: scenario{name: "app bound to lo to ::1 passes", uid: appUID, gid: appUID, dst: "[::1]:8080", shape: testpod.Shape{BindDevice: "lo"}}},
	{scenario: scenario{name: "app bound to lo to the pod IP", uid: appUID, gid: appUID, dst: "pod6:8080", shape: testpod.Shape{BindDevice: "lo"}}},
	{scenario: scenario{name: "app bound to lo to link-local fe80::1", uid: appUID, gid: appUID, dst: "[fe80::1]:80", shape: testpod.Shape{BindDevice: "lo"}}},
	// SO_BINDTODEVICE eth0.
	{scenario: scenario{name: "app bound to eth0 to a remote is captured and goes nowhere", uid: appUID, gid: appUID, dst: "remote6:80", shape: testpod.Shape{BindDevice: "eth0"}}},
	{scenario: scenario{name: "proxy bound to eth0 to a remote passes", uid: proxyUID, gid: proxyUID, dst: "remote6:80", shape: testpod.Shape{BindDevice: "eth0"}}},
	{scenario: scenario{name: "app bound to eth0 to an excluded port passes", flags: []string{"-o", "80"}, uid: appUID, gid: appUID, dst: "remote6:80", shape: testpod.Shape{BindDevice: "eth0"}}},
	{scenario: scenario{name: "app bound to eth0 to link-local fe80::1", uid: appUID, gid: appUID, dst: "[fe80::1]:80", shape: testpod.Shape{BindDevice: "eth0"}}},
	// TCP Fast Open (edgeScenarios; with a cookie, the captured rows are in
	// TestDocumentedDifferences).
	{scenario: scenario{name: "TFO: app to remote is captured", uid: appUID, gid: appUID, dst: "remote6:80", shape: testpod.Shape{FastOpen: true}}},
	{scenario: scenario{name: "TFO: proxy to remote passes", uid: proxyUID, gid: proxyUID, dst: "remote6:80", shape: testpod.Shape{FastOpen: true}}},
	{scenario: scenario{name: "TFO with a cookie: excluded outbound port passes", flags: []string{"-o", "8080"}, uid: appUID, gid: appUID, dst: "pod6:8080", shape: testpod.Shape{FastOpen: true}, tfoCookie: true}},
	{scenario: scenario{name: "TFO with a cookie: app to own pod IP passes", uid: appUID, gid: appUID, dst: "pod6:8080", shape: testpod.Shape{FastOpen: true}, tfoCookie: true}},
	// io_uring.
	{scenario: scenario{name: "io_uring: app to remote is captured", uid: appUID, gid: appUID, dst: "remote6:80", shape: testpod.Shape{IOURing: true}}},
	{scenario: scenario{name: "io_uring on a worker: app to remote is captured", uid: appUID, gid: appUID, dst: "remote6:80", shape: testpod.Shape{IOURingAsync: true}}},
	{scenario: scenario{name: "io_uring on a worker: proxy to remote passes", uid: proxyUID, gid: proxyUID, dst: "remote6:80", shape: testpod.Shape{IOURingAsync: true}}},
	// Whose socket it is: the socket file's ids, as xt_owner matches them in ip6tables too.
	{scenario: scenario{name: "socket made by the app, connected as the proxy, is captured", uid: appUID, gid: appUID, dst: "remote6:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(appUID, appUID), Connect: testpod.Same(proxyUID, proxyUID)}}}},
	{scenario: scenario{name: "socket made by the proxy, connected as the app, passes", uid: proxyUID, gid: proxyUID, dst: "remote6:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(proxyUID, proxyUID), Connect: testpod.Same(appUID, appUID)}}}},
	{scenario: scenario{name: "socket made by the proxy, connected as the app, to the pod IP hairpins", uid: proxyUID, gid: proxyUID, dst: "pod6:8080",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(proxyUID, proxyUID), Connect: testpod.Same(appUID, appUID)}}}},
	{scenario: scenario{name: "socket made with the proxy gid, connected with the app's, passes", uid: appUID, gid: proxyUID, dst: "remote6:80",
		shape: testpod.Shape{IDs: &testpod.IDSwitch{Socket: testpod.Same(appUID, proxyUID), Connect: testpod.Same(appUID, appUID)}}}},
	// v4-mapped beside native IPv6: IPv4's refusals from a dual-stack socket.
	{scenario: scenario{name: "v4-mapped socket: app to 255.255.255.255 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "255.255.255.255:80", v4mapped: true}, needs4: true},
	{scenario: scenario{name: "v4-mapped socket: app to multicast 224.0.0.1 is the kernel's ENETUNREACH", uid: appUID, gid: appUID, dst: "224.0.0.1:80", v4mapped: true}, needs4: true},
}

// TestDocumentedDifferencesIPv6 is TestDocumentedDifferences in an IPv6-only pod: the same
// differences, for the same reasons (docs/semantics.md). IPv6's option never fits in a
// SYN, so a SYN with a TFO cookie that makes the proxy's socket by itself loses it too.
func TestDocumentedDifferencesIPv6(t *testing.T) {
	unreadable := "unreadable: no such file or directory"
	documentedDifferences(t, func(t *testing.T) *world { return newWorld6(t, testpod.IPv6Only) }, []difference{
		{scenario{name: "app straight to the proxy's [::1]:15001", uid: appUID, gid: appUID, dst: "[::1]:15001"},
			outcome{Landed: "proxy6:15001", Orig: "[::1]:15001"}, outcome{Landed: "proxy6:15001", Orig: unreadable}},
		{scenario{name: "TFO with a cookie: app to remote is captured", uid: appUID, gid: appUID, dst: "remote6:80", shape: testpod.Shape{FastOpen: true}, tfoCookie: true},
			outcome{Landed: "proxy6:15001", Orig: "[{remote6}]:80"}, outcome{Landed: "proxy6:15001", Orig: unreadable}},
		{scenario{name: "TFO with a cookie: proxy to own pod IP hairpins", uid: proxyUID, gid: proxyUID, dst: "pod6:8080", shape: testpod.Shape{FastOpen: true}, tfoCookie: true},
			outcome{Landed: "proxy6:15006", Orig: "[{pod6}]:8080"}, outcome{Landed: "proxy6:15006", Orig: unreadable}},
	})
}
