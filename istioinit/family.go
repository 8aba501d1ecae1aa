package istioinit

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/meshdivert/divert/policy"
)

// IP families in istio-iptables mode: which ones the pod's rules capture.

// decideFamilies reads the pod's addresses and decides, as istio-iptables does, whether
// its IPv6 connections are captured too (policy.Config.DecideIPv6). istio-iptables does not
// read $ISTIO_AGENT_DUAL_STACK, the pre-1.18 name of $ISTIO_DUAL_STACK, and neither does
// divert; one line says so when it alone asks for dual stack.
func (r *run) decideFamilies() error {
	addrs, err := r.e.PodAddrs()
	if err != nil {
		return fmt.Errorf("read this pod's addresses: %w", err)
	}
	r.ips = nil
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
				r.ips = append(r.ips, ip.Unmap())
			}
		}
	}
	if on, _ := strconv.ParseBool(strings.TrimSpace(r.e.Getenv(envAgentDualStack))); on && !r.cfg.DualStack {
		fmt.Fprintf(r.e.Stderr, "divert: $%s is not read (istio-iptables reads --%s, $DUAL_STACK and $%s): dual stack stays off\n",
			envAgentDualStack, policy.FlagDualStack, policy.EnvDualStack)
	}
	r.cfg.DecideIPv6(r.ips)
	return nil
}

// envAgentDualStack is the pre-1.18 name of $ISTIO_DUAL_STACK, still found in meshes'
// proxyMetadata.
const envAgentDualStack = "ISTIO_AGENT_DUAL_STACK"
