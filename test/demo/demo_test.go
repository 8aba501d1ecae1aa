// Package demo is `make demo`: a demo pod, divert attached with the real CLI, a few
// connections through a proxy, and a short story of what happened to each. It also runs
// in `make test`, where it checks the story is true.
package demo

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshdivert/divert/test/testutil"

	"github.com/meshdivert/divert/test/testpod"
)

var divertBin = flag.String("divert", "", "divert binary to demo (default: build one)")

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested()
	flag.Parse()
	os.Exit(m.Run())
}

const (
	proxyUID = 1337
	appUID   = 1000
)

func say(format string, args ...any) { fmt.Printf(format+"\n", args...) }

func TestDemo(t *testing.T) {
	testutil.RequirePrivileged(t)
	bin := *divertBin
	if bin == "" {
		bin = filepath.Join(t.TempDir(), "divert")
		if out, err := exec.Command("go", "build", "-o", bin, "github.com/meshdivert/divert/cmd/divert").CombinedOutput(); err != nil {
			t.Fatalf("build divert: %v\n%s", err, out)
		}
	}
	divert := func(args ...string) string {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("divert %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	pod := testpod.New(t)
	web := netip.AddrPortFrom(pod.Net.Addrs[0], 80)
	db := netip.AddrPortFrom(pod.Net.Addrs[1], 5432)
	any := netip.IPv4Unspecified()
	pod.Net.Server(t, "web", netip.AddrPortFrom(any, 80))
	pod.Net.Server(t, "db", netip.AddrPortFrom(any, 5432))
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "forward", UID: proxyUID, GID: proxyUID,
		Listen:     []netip.AddrPort{netip.AddrPortFrom(any, 15001), netip.AddrPortFrom(any, 15006)},
		InboundSrc: netip.MustParseAddr("127.0.0.6")})
	pod.Server(t, "app", netip.AddrPortFrom(any, 8080), appUID, appUID)

	say("== divert demo ==")
	say("A pod %s (address %s) runs an app as uid %d (serving on :8080) and a sidecar proxy as uid %d", pod.Name, pod.Addr, appUID, proxyUID)
	say("listening on :15001 (outbound) and :15006 (inbound).")
	say("Outside the pod: a web server at %s and a database at %s.", web, db)
	say("")
	say("$ divert attach --pod-id %s --cgroup <pod cgroup> --netns <pod netns> -x %s/32", pod.Name, db.Addr())
	fmt.Print(indent(divert("attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "-x", db.Addr().String()+"/32")))
	attached := true
	t.Cleanup(func() {
		if attached {
			exec.Command(bin, "detach", "--pod-id", pod.Name).Run()
		}
	})
	say("")

	story := func(who string, uid uint32, dst netip.AddrPort, wantProxy bool) {
		var res testpod.Result
		if who == "a client outside the pod" {
			res = pod.Net.Dial(t, testpod.Target{Dst: dst})[0]
			say("%s dials %s", who, dst)
		} else {
			res = pod.Dial(t, uid, uid, testpod.Target{Dst: dst})[0]
			say("%s (uid %d) dials %s", who, uid, dst)
		}
		if res.Err != "" {
			t.Fatalf("  failed: %s", res.Err)
		}
		viaProxy := false
		for _, h := range res.Hops {
			switch {
			case h.Who == "proxy":
				viaProxy = true
				say("  -> landed on the proxy's listener %s (socket %s, peer %s)", h.Listener, h.Local, h.Peer)
				say("     the proxy asked getsockopt(SO_ORIGINAL_DST) and read %s, and forwarded there", h.Orig)
				if h.Orig != dst.String() {
					t.Errorf("proxy read %s, the app dialled %s", h.Orig, dst)
				}
			default:
				say("  -> %s answered at %s, seeing the connection come from %s", h.Who, h.Local, h.Peer)
			}
		}
		if viaProxy != wantProxy {
			t.Errorf("%s -> %s: through the proxy = %v, want %v", who, dst, viaProxy, wantProxy)
		}
	}
	story("the app", appUID, web, true)
	story("the app", appUID, db, false)
	say("     (%s is excluded with -x, so it went straight out)", db.Addr())
	story("the proxy", proxyUID, web, false)
	say("     (the proxy's own uid is never captured: no loops)")
	story("a client outside the pod", 0, netip.AddrPortFrom(pod.Addr, 8080), true)
	say("     (sk_lookup handed it to the :15006 listener without NAT: the socket's own address is")
	say("      the original destination; the proxy forwarded it to the app from 127.0.0.6)")
	say("")
	say("$ divert status")
	fmt.Print(indent(divert("status", "--pod-id", pod.Name)))
	say("")
	say("$ divert detach --pod-id %s", pod.Name)
	fmt.Print(indent(divert("detach", "--pod-id", pod.Name)))
	attached = false
	story("the app", appUID, web, false)
	say("     (detached: traffic flows as if divert had never been there)")
	say("")
	say("The demo pod, its namespaces, cgroup and processes are removed now.")
}

func indent(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return "  " + strings.Join(lines, "\n  ") + "\n"
}
