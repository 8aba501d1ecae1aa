package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// result and hop mirror test/testpod's Result and Hop: the JSON the test app's client
// prints and its servers and proxy write, one hop per listener the connection went through.
type result struct {
	Dst  string `json:"dst"`
	Err  string `json:"err"`
	Hops []hop  `json:"hops"`
}

type hop struct {
	Who      string `json:"who"`
	Listener string `json:"listener"`
	Local    string `json:"local"`
	Peer     string `json:"peer"`
	Orig     string `json:"orig"`
	OrigErr  string `json:"orig_err"`
	Err      string `json:"err"`
}

// dial runs the test app's client in a pod's container (kubectl exec: a process in that
// container's cgroup, as the container's uid) and returns its one result.
func dial(pod, ctr, target string) (result, error) {
	out, err := suite.c.Kubectl(ctx, "exec", "-n", namespace, pod, "-c", ctr, "--",
		"/testapp", "client", "--timeout", "3s", "--target", target)
	if err != nil {
		return result{}, err
	}
	var r result
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
		return result{}, fmt.Errorf("client output %q: %w", out, err)
	}
	return r, nil
}

// want is what one hop must show; empty fields are not checked.
type want struct {
	who      string
	listener string // the proxy listener that accepted
	orig     string // SO_ORIGINAL_DST as the proxy read it
	local    string // the accepted socket's local address
	peerIP   string // the accepted socket's peer address, without port
}

// check is the one judge of every scenario (the negative one included): the connection
// must have gone through exactly these hops, in order.
func check(r result, wants ...want) error {
	if r.Err != "" {
		return fmt.Errorf("client to %s: %s (after %d hops: %s)", r.Dst, r.Err, len(r.Hops), path(r))
	}
	if len(r.Hops) != len(wants) {
		return fmt.Errorf("client to %s went through %s, want %d hops", r.Dst, path(r), len(wants))
	}
	for i, w := range wants {
		h := r.Hops[i]
		if h.Err != "" || h.OrigErr != "" {
			return fmt.Errorf("hop %d (%s): err %q, orig_err %q", i, h.Who, h.Err, h.OrigErr)
		}
		peer, _ := netip.ParseAddrPort(h.Peer)
		for _, f := range []struct{ name, got, want string }{
			{"who", h.Who, w.who}, {"listener", h.Listener, w.listener}, {"original destination", h.Orig, w.orig},
			{"local address", h.Local, w.local}, {"peer address", peer.Addr().String(), w.peerIP},
		} {
			if f.want != "" && f.got != f.want {
				return fmt.Errorf("hop %d (%s): %s %s, want %s (path %s)", i, h.Who, f.name, f.got, f.want, path(r))
			}
		}
	}
	return nil
}

func path(r result) string {
	var ws []string
	for _, h := range r.Hops {
		s := h.Who
		if h.Orig != "" {
			s += "(orig " + h.Orig + ")"
		}
		ws = append(ws, s)
	}
	if len(ws) == 0 {
		return "nothing"
	}
	return strings.Join(ws, " -> ")
}

func addr(pod, port string) string { return suite.ips[pod] + ":" + port }

// run dials and checks, and notes the path in the table.
func expect(t *testing.T, r *row, from, ctr, to string, wants ...want) {
	t.Helper()
	res, err := dial(from, ctr, to)
	if err != nil {
		t.Fatal(err)
	}
	r.note("%s", path(res))
	if err := check(res, wants...); err != nil {
		r.note("%v", err)
		t.Fatal(err)
	}
}

// outbound: the app's connect() to an outside server lands on its proxy's 15001 listener,
// the proxy reads the server's address with SO_ORIGINAL_DST and reaches it (its own dial
// as uid 1337 is not captured), and the server answers.
func outbound(t *testing.T, meshed string) {
	r := scenario(t)
	expect(t, r, meshed, "app", addr(plainName, appPort),
		want{who: meshed + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
		want{who: plainName})
}

// outboundV4Mapped is outbound from a dual-stack AF_INET6 socket to ::ffff:<plain IP>, as
// Java dials IPv4 addresses: IPv4 on the wire, captured by iptables' IPv4 rules, and by
// eBPF's connect6 program.
func outboundV4Mapped(t *testing.T, meshed string) {
	r := scenario(t)
	expect(t, r, meshed, "app", "v4mapped:"+addr(plainName, appPort),
		want{who: meshed + "-proxy", listener: "0.0.0.0:" + outboundPrt, orig: addr(plainName, appPort)},
		want{who: plainName})
}

// inbound: a connection from outside to the app's port lands on the proxy's 15006
// listener with the app's address as original destination; the proxy forwards from
// 127.0.0.6 (not captured again) and the app answers. local says which backend did it:
// sk_lookup hands the connection over unchanged (local = original destination), iptables
// REDIRECT rewrites it to <pod IP>:15006.
func inbound(t *testing.T, meshed, local string) {
	r := scenario(t)
	expect(t, r, plainName, "app", addr(meshed, appPort),
		want{who: meshed + "-proxy", listener: "0.0.0.0:" + inboundPrt, orig: addr(meshed, appPort), local: local},
		want{who: meshed + "-app", peerIP: "127.0.0.6"})
}
