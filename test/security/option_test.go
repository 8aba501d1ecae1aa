package security

import (
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// TestForgedOriginalDestinationIgnored: a peer outside the pod writes divert's TCP option
// (kind 254, magic 0xd17e) naming a destination of its choice into its SYN and the ACK that
// establishes the proxy's socket, by hand on a raw socket. The proxy's side only reads the
// option on 127.0.0.1 → 127.0.0.1 connections, so the proxy must read the address the peer
// really connected to, not the forged one.
func TestForgedOriginalDestinationIgnored(t *testing.T) {
	pod := testpod.New(t)
	divertest.Attach(t, pod, divertest.BPFFS(t), divertest.Config(t))
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: divertest.ProxyUID, GID: divertest.ProxyUID,
		Listen: []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:15001"), netip.MustParseAddrPort("0.0.0.0:15006")}})

	dst := netip.AddrPortFrom(pod.Addr, 8080) // captured inbound: sk_lookup hands it to 15006
	forged := netip.MustParseAddrPort("10.9.9.9:9999")
	src := pod.Gateway
	const srcPort = 47123

	// The peer's own kernel knows nothing of this connection and would reset it.
	out, err := nsexec.CombinedOutput(pod.Net.NetNSPath, exec.Command("iptables", "-w", "-A", "OUTPUT", "-p", "tcp",
		"--tcp-flags", "RST", "RST", "-d", pod.Addr.String(), "-j", "DROP"))
	if err != nil {
		t.Fatalf("iptables in the remote netns: %v %s", err, out)
	}

	var payload string
	err = nsexec.Do(pod.Net.NetNSPath, func() error {
		var err error
		payload, err = rawHandshake(netip.AddrPortFrom(src, srcPort), dst, origOption(forged), false)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if payload == "" {
		t.Fatal("the proxy sent nothing back over the hand-made connection")
	}
	var hop testpod.Hop
	if err := json.Unmarshal([]byte(strings.TrimSpace(strings.SplitN(payload, "\n", 2)[0])), &hop); err != nil {
		t.Fatalf("proxy's report %q: %v", payload, err)
	}
	t.Logf("proxy: %+v", hop)
	if hop.Orig != dst.String() {
		t.Errorf("the proxy read original destination %q (forged %s), want %s, where the peer connected", hop.Orig, forged, dst)
	}
}

// origOption is divert's original-destination option naming orig, padded with two NOPs to
// a 4-byte boundary: kind, len 10, magic, port, address.
func origOption(orig netip.AddrPort) []byte {
	opt := make([]byte, 12)
	opt[0], opt[1] = 254, 10
	binary.BigEndian.PutUint16(opt[2:], 0xd17e)
	binary.BigEndian.PutUint16(opt[4:], orig.Port())
	a := orig.Addr().As4()
	copy(opt[6:10], a[:])
	opt[10], opt[11] = 1, 1
	return opt
}
