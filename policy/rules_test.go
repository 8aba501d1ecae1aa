package policy_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshdivert/divert/policy"
)

// The shared rules, by the istio-iptables flags that shape them.
func TestRules(t *testing.T) {
	for _, tc := range []struct {
		args                            []string
		inbound, tunnelPasses, loopback bool
		excludes                        []uint16
	}{
		{nil, true, true, false, []uint16{15090, 15021, 15020}},
		{[]string{"-b", "8080", "-d", "8080,9090"}, true, true, false, nil},
		{[]string{"-b", ""}, false, true, false, nil},
		{[]string{"-b", "", "-m", "TPROXY"}, false, false, false, nil},
		{[]string{"-m", "TPROXY", "-d", "22"}, true, false, false, []uint16{22}},
		{[]string{"-i", "10.0.0.0/8,127.1.2.3/32"}, true, true, true, []uint16{15090, 15021, 15020}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			cfg := mustParse(t, tc.args...)
			require.Equal(t, tc.inbound, cfg.CapturesInbound(), "CapturesInbound")
			require.Equal(t, tc.tunnelPasses, cfg.InboundTunnelPasses(), "InboundTunnelPasses")
			require.Equal(t, tc.loopback, cfg.CapturesLoopback(), "CapturesLoopback")
			require.Equal(t, tc.excludes, cfg.InboundExcludes(), "InboundExcludes")
		})
	}
}

func TestDstLocal(t *testing.T) {
	pod := []netip.Addr{netip.MustParseAddr("10.1.0.5")}
	for dst, want := range map[string]bool{
		"127.0.0.1": true, "127.9.9.9": true, "::1": true, "::ffff:127.0.0.1": true,
		"10.1.0.5": true, "::ffff:10.1.0.5": true,
		"10.1.0.6": false, "0.0.0.0": false, "fd00::5": false,
	} {
		require.Equal(t, want, policy.DstLocal(netip.MustParseAddr(dst), pod), dst)
	}
	require.False(t, policy.DstLocal(netip.MustParseAddr("10.1.0.5"), nil), "no pod addresses: only loopback")
}

// The programs read TPROXY mode's transparent passthrough from inbound_tunnel_passes (one
// byte of config for both): the two rules must stay two faces of one mode.
func TestTransparentPassthroughIsTProxyMode(t *testing.T) {
	for _, m := range []policy.InterceptMode{policy.Redirect, policy.TProxy} {
		c := policy.Config{Mode: m}
		if c.TransparentPassthrough() == c.InboundTunnelPasses() {
			t.Errorf("mode %s: TransparentPassthrough %v, InboundTunnelPasses %v; bpf/divert.c reads one as !the other",
				m, c.TransparentPassthrough(), c.InboundTunnelPasses())
		}
	}
}

func TestSrcForeign(t *testing.T) {
	pod := []netip.Addr{netip.MustParseAddr("10.244.0.5")}
	for src, want := range map[string]bool{"": false, "0.0.0.0": false, "127.0.0.6": false, "10.244.0.5": false,
		"10.0.0.7": true, "::ffff:10.244.0.5": false, "::ffff:10.0.0.7": true} {
		var a netip.Addr
		if src != "" {
			a = netip.MustParseAddr(src)
		}
		if got := policy.SrcForeign(a, pod); got != want {
			t.Errorf("SrcForeign(%q) = %v, want %v", src, got, want)
		}
	}
}
