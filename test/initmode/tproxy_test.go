package initmode

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/image"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// TPROXY mode from the init container, as Istio's injector asks for it (-m TPROXY): the
// proxy forwards an inbound connection from the client's address, as Envoy's original_src
// does, and the app sees the client (docs/semantics.md, "TPROXY mode"). The init container
// sets up the return path in the pod's netns and exits; it outlives it.
func TestTProxyInitContainer(t *testing.T) {
	divert := image.Divert(t)
	k := newK8sPod(t, cgroupfsLayout)
	opts := divertest.BPFFS(t)
	args := append(append([]string{"istio-iptables"}, injectorArgs...), "--bpffs", opts.BPFFS, "-m", "TPROXY")
	r := initContainer(t, k, nil, divert, args...)
	r.mustSucceed(t, "istio-iptables -m TPROXY")
	t.Cleanup(func() { loader.Detach(k.UID, opts) })
	if !strings.Contains(r.stdout, "attached pod "+k.UID+" with eBPF") {
		t.Fatalf("TPROXY mode should be captured with eBPF:\n%s", r.stdout)
	}
	k.container(t).StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "forward", UID: proxyUID, GID: proxyUID,
		Transparent: true, OriginalSrcMark: 1337,
		Listen: []netip.AddrPort{netip.AddrPortFrom(anyAddr, 15001), netip.AddrPortFrom(anyAddr, 15006)}})
	k.container(t).Server(t, "app", netip.AddrPortFrom(anyAddr, 8080), appUID, appUID)

	client, dst := k.Net.Addrs[0], netip.AddrPortFrom(k.Addr, 8080)
	res := k.Net.Dial(t, testpod.Target{Dst: dst, BindSrc: client})[0]
	if res.Err != "" || len(res.Hops) != 2 {
		t.Fatalf("remote %s -> %s: %+v, want the proxy and then the app", client, dst, res)
	}
	p, app := res.Hops[0], res.Hops[1]
	if p.Who != "proxy" || p.Listener != "0.0.0.0:15006" || p.Orig != dst.String() || p.Err != "" {
		t.Errorf("first hop %+v, want the proxy's 15006 listener reading %s", p, dst)
	}
	if peer, err := netip.ParseAddrPort(app.Peer); app.Who != "app" || err != nil || peer.Addr() != client || app.Peer != p.UpstreamSrc {
		t.Errorf("second hop %+v, want the app seeing the client's address %s (the proxy's upstream %s)", app, client, p.UpstreamSrc)
	}
}
