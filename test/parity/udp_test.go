package parity

import (
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// UDP is never captured by either backend: a datagram from the app reaches the remote
// unchanged, and eBPF counts no verdict for it. Under iptables the rule that let it
// through must be istio's: with -o P the UDP RETURN for P (istio returns UDP to excluded
// ports too), otherwise the catch-all jump to ISTIO_REDIRECT, whose REDIRECT is TCP-only.
// Delivery alone cannot tell those apart, so the iptables arms read the per-rule packet
// counters of the pod's nat ISTIO_OUTPUT chain.
func TestUDPParity(t *testing.T) {
	const port = 5353
	cases := []struct {
		name  string
		flags []string
		rule  string // the ISTIO_OUTPUT rule (iptables-save form) that must count the datagram; "" none
	}{
		{"excluded outbound port returns UDP", []string{"-o", "5353"}, "-A ISTIO_OUTPUT -p udp -m udp --dport 5353 -j RETURN"},
		{"another excluded port does not", []string{"-o", "5354"}, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"},
		{"not included: no rule", []string{"-i", ""}, ""},
	}
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			w := newWorld(t)
			b.setup(t, w)
			dst := netip.AddrPortFrom(w.pod.Net.Addrs[0], port)
			remote := listenUDP(t, w.pod.Net.NetNSPath, port)
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					b.apply(t, w, divertest.Config(t, c.flags...))
					before := natOutputCounters(t, b.name, w.pod.NetNSPath)
					out := w.pod.Start(t, testpod.ProcSpec{UID: appUID, GID: appUID, Args: []string{"udp", dst.String()}}).Wait(t, 5*time.Second)
					if got := strings.TrimSpace(out); got != dst.String() {
						t.Errorf("UDP socket connected to %q, want %s (untouched)", got, dst)
					}
					if from, err := readUDP(remote); err != nil || from.Addr() != w.pod.Addr {
						t.Errorf("the remote got the datagram from %v (%v), want it from the pod %s", from, err, w.pod.Addr)
					}
					if b.after != nil {
						b.after(t, w, policy.Verdict{Reason: noVerdict})
					}
					if before == nil {
						return
					}
					var counted []string
					for i, r := range natOutputCounters(t, b.name, w.pod.NetNSPath) {
						if i >= len(before) || r.rule != before[i].rule {
							t.Fatalf("ISTIO_OUTPUT changed while the datagram was sent")
						}
						if r.packets != before[i].packets {
							counted = append(counted, r.rule)
						}
					}
					var want []string
					if c.rule != "" {
						want = append(want, c.rule)
					}
					if !slices.Equal(counted, want) {
						t.Errorf("%v: rules that counted the datagram: %q, want %q", c.flags, counted, want)
					}
				})
			}
		})
	}
}

// listenUDP binds a UDP socket to port in the network namespace at path.
func listenUDP(t *testing.T, netnsPath string, port uint16) *net.UDPConn {
	var c *net.UDPConn
	err := nsexec.Do(netnsPath, func() error {
		var err error
		c, err = net.ListenUDP("udp4", &net.UDPAddr{Port: int(port)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readUDP waits for testpod's datagram and returns its source.
func readUDP(c *net.UDPConn) (netip.AddrPort, error) {
	buf := make([]byte, 64)
	for {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return netip.AddrPort{}, err
		}
		if string(buf[:n]) == testpod.UDPPayload {
			return netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), nil
		}
	}
}

type ruleCounter struct {
	rule    string
	packets string
}

// natOutputCounters reads the packet counter of every rule of the pod's nat ISTIO_OUTPUT
// chain, in order, with the iptables flavour backend names; nil for other backends.
func natOutputCounters(t *testing.T, backend, netnsPath string) []ruleCounter {
	flavour, ok := strings.CutPrefix(backend, "iptables-")
	if !ok {
		return nil
	}
	out, err := exec.Command("nsenter", "--net="+netnsPath, "iptables-"+flavour+"-save", "-c", "-t", "nat").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables-%s-save: %v\n%s", flavour, err, out)
	}
	rules := []ruleCounter{}
	for _, l := range strings.Split(string(out), "\n") {
		// [packets:bytes] -A CHAIN ...
		counters, rule, ok := strings.Cut(l, "] ")
		if !ok || !strings.HasPrefix(counters, "[") || !strings.HasPrefix(rule, "-A ISTIO_OUTPUT ") {
			continue
		}
		packets, _, _ := strings.Cut(counters[1:], ":")
		rules = append(rules, ruleCounter{rule: rule, packets: packets})
	}
	if len(rules) == 0 {
		t.Fatalf("no ISTIO_OUTPUT rules in iptables-%s-save:\n%s", flavour, out)
	}
	return rules
}
