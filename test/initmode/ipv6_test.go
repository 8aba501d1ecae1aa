package initmode

import (
	"cmp"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/image"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// A dual-stack pod with $ISTIO_DUAL_STACK has both families captured, through the real
// binary as istio-init runs it: by eBPF by default (programs attached, no rules, ::6 put
// on lo, divert status saying IPv6 is captured), and with --mode iptables by istio's
// iptables and ip6tables rules. Either way IPv6 connections reach the proxy's [::]
// listeners with their original destination, and --cleanup-only removes everything.
func TestIPv6Pod(t *testing.T) {
	divert := image.Divert(t)
	env := []string{"ISTIO_DUAL_STACK=true"}
	for _, mode := range []string{"", "iptables"} {
		t.Run("mode "+cmp.Or(mode, "auto"), func(t *testing.T) {
			k := newK8sPodStack(t, cgroupfsLayout, testpod.DualStack)
			opts := divertest.BPFFS(t)
			args := []string{"istio-iptables", "--bpffs", opts.BPFFS}
			if mode != "" {
				args = append(args, "--mode", mode)
			}
			r := initContainer(t, k, env, divert, append(args, injectorArgs...)...)
			r.mustSucceed(t, "istio-iptables on a dual-stack pod")
			if strings.TrimSpace(r.stderr) != "" || !strings.Contains(r.stdout, "IPv4 and IPv6 (dual stack") {
				t.Errorf("stdout %q, stderr %q", r.stdout, r.stderr)
			}
			if mode == "" {
				if n := divertest.AttachedPrograms(t, k.view()); n == 0 || istioRules(t, k.NetNSPath)+ip6Rules(t, k.NetNSPath) != "" {
					t.Errorf("auto mode: %d programs attached, rules %q", n, istioRules(t, k.NetNSPath)+ip6Rules(t, k.NetNSPath))
				}
				out, err := exec.Command(divert, "status", "--bpffs", opts.BPFFS).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "ipv6     captured") {
					t.Errorf("divert status should say IPv6 is captured: %v\n%s", err, out)
				}
			} else if rules := ip6Rules(t, k.NetNSPath); !strings.Contains(rules, "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN") {
				t.Fatalf("istio's IPv6 rules are not in the pod's netns:\n%s", rules)
			}
			if addrs, err := iptables.PodAddrs(k.NetNSPath); err != nil || !slices.Contains(addrs, netip.MustParseAddr("::6")) {
				t.Errorf("::6 is not on lo: %v %v", addrs, err)
			}

			// IPv6 capture, outbound and inbound, as the parity suite checks it in detail.
			proxy, app := k.container(t), k.container(t)
			var listen []netip.AddrPort
			for _, p := range []uint16{15001, 15006} {
				listen = append(listen, netip.AddrPortFrom(anyAddr, p), netip.AddrPortFrom(netip.IPv6Unspecified(), p))
			}
			proxy.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: proxyUID, GID: proxyUID, Listen: listen, V6Only: true})
			k.Net.Server(t, "remote", netip.AddrPortFrom(netip.IPv6Unspecified(), 80))
			remote6, pod6 := netip.AddrPortFrom(testpod.PrimaryAddr6, 80), netip.AddrPortFrom(k.Addr6, 8080)
			for _, c := range []struct {
				name string
				res  testpod.Result
				want string
			}{
				{"app to a remote IPv6 service", app.Dial(t, appUID, appUID, testpod.Target{Dst: remote6})[0], "proxy via [::]:15001 read " + remote6.String()},
				{"app to it from a dual-stack socket", app.Dial(t, appUID, appUID, testpod.Target{Dst: remote6, Shape: testpod.Shape{DualStack: true}})[0], "proxy via [::]:15001 read " + remote6.String()},
				{"the proxy to it", proxy.Dial(t, proxyUID, proxyUID, testpod.Target{Dst: remote6})[0], "answered by remote"},
				{"inbound over IPv6", k.Net.Dial(t, testpod.Target{Dst: pod6})[0], "proxy via [::]:15006 read " + pod6.String()},
			} {
				got := c.res.Err
				if len(c.res.Hops) == 1 {
					h := c.res.Hops[0]
					got = "answered by " + h.Who
					if h.Listener != "" {
						got = fmt.Sprintf("%s via %s read %s", h.Who, h.Listener, h.Orig)
					}
				}
				if got != c.want {
					t.Errorf("%s: %s, want %s", c.name, got, c.want)
				}
			}

			r = initContainer(t, k, nil, divert, "istio-iptables", "--cleanup-only", "--bpffs", opts.BPFFS)
			r.mustSucceed(t, "--cleanup-only")
			if rules := istioRules(t, k.NetNSPath) + ip6Rules(t, k.NetNSPath); rules != "" {
				t.Errorf("rules left after --cleanup-only:\n%s", rules)
			}
			divertest.AssertNothingAttached(t, k.view(), opts)
		})
	}
}
