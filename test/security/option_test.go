package security

import (
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/divertest"
	"github.com/meshdivert/divert/internal/nsexec"
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
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		tv := unix.Timeval{Sec: 1}
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		to := &unix.SockaddrInet4{Addr: dst.Addr().As4()}
		send := func(flags uint8, seq, ack uint32) error {
			return unix.Sendto(fd, segment(src, dst.Addr(), srcPort, dst.Port(), seq, ack, flags, forged), 0, to)
		}
		const isn = 1000
		if err := send(0x02, isn, 0); err != nil { // SYN
			return err
		}
		var serverSeq uint32
		synAcked := false
		buf := make([]byte, 65536)
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue // timeout: look again until the deadline
			}
			ihl := int(buf[0]&0x0f) * 4
			tcp := buf[ihl:n]
			if len(tcp) < 20 || binary.BigEndian.Uint16(tcp[0:2]) != dst.Port() || binary.BigEndian.Uint16(tcp[2:4]) != srcPort {
				continue
			}
			flags, doff := tcp[13], int(tcp[12]>>4)*4
			switch {
			case !synAcked && flags&0x12 == 0x12: // SYN-ACK
				serverSeq = binary.BigEndian.Uint32(tcp[4:8])
				synAcked = true
				if err := send(0x10, isn+1, serverSeq+1); err != nil { // ACK: establishes
					return err
				}
			case synAcked && len(tcp) > doff: // the proxy's report
				payload = string(tcp[doff:])
				return nil
			}
		}
		return nil
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

// segment builds a TCP segment carrying divert's original-destination option for orig.
func segment(src, dst netip.Addr, sport, dport uint16, seq, ack uint32, flags uint8, orig netip.AddrPort) []byte {
	opt := make([]byte, 12) // kind, len 10, magic, port, addr; two NOPs to a 4-byte boundary
	opt[0], opt[1] = 254, 10
	binary.BigEndian.PutUint16(opt[2:], 0xd17e)
	binary.BigEndian.PutUint16(opt[4:], orig.Port())
	a := orig.Addr().As4()
	copy(opt[6:10], a[:])
	opt[10], opt[11] = 1, 1
	seg := make([]byte, 20+len(opt))
	binary.BigEndian.PutUint16(seg[0:], sport)
	binary.BigEndian.PutUint16(seg[2:], dport)
	binary.BigEndian.PutUint32(seg[4:], seq)
	binary.BigEndian.PutUint32(seg[8:], ack)
	seg[12] = byte(len(seg)/4) << 4
	seg[13] = flags
	binary.BigEndian.PutUint16(seg[14:], 65535)
	copy(seg[20:], opt)
	// Checksum over the IPv4 pseudo-header and the segment.
	s4, d4 := src.As4(), dst.As4()
	pseudo := append(append(append([]byte{}, s4[:]...), d4[:]...), 0, unix.IPPROTO_TCP, byte(len(seg)>>8), byte(len(seg)))
	var sum uint32
	for _, b := range [][]byte{pseudo, seg} {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(seg[16:], ^uint16(sum))
	return seg
}
