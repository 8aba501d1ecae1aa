package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/link"
	"github.com/meshdivert/divert/maps"
)

// PodStatus is what the kernel holds for one attached pod, read back from the pins.
type PodStatus struct {
	ID string `json:"id"`
	// Pod is the pod's Kubernetes namespace/name, where the attacher knew it (Pod.Name).
	Pod      string            `json:"pod,omitempty"`
	Programs []ProgramStatus   `json:"programs"`
	Policy   PolicyStatus      `json:"policy"`
	Counters map[string]uint64 `json:"counters"`
	// CountersByFamily splits Counters by address family, "ipv4" (IPv4 dialled from
	// dual-stack sockets too) and "ipv6" (native); only reasons counted are listed.
	CountersByFamily map[string]map[string]uint64 `json:"countersByFamily"`
	// Drops counts what the programs gave up on, by kind (every kind listed, zero or not):
	// a connection refused or an original destination not delivered.
	Drops map[string]uint64 `json:"drops"`
	// Inert says the pod's programs let everything pass: an attach or detach was killed
	// midway (see crash.go), and running it again finishes it. Its port lists are not shown.
	Inert bool `json:"inert,omitempty"`
	// Fallback is why the pod is captured by iptables instead (see RecordFallback); a pod
	// with only a fallback marker has no programs, policy or counters here.
	Fallback string `json:"iptablesFallback,omitempty"`
	// Defunct says the kernel detached programs because the pod's cgroup or netns went.
	Defunct bool `json:"defunct"`
	// Listeners counts the proxy's inbound listeners sk_lookup can hand connections to
	// (absent when inbound capture is off).
	Listeners *int `json:"listeners,omitempty"`
	// OutsideCgroup are the processes in the pod's netns but outside its cgroup (see
	// ProcsOutside; filled by CheckOutsiders, which divert status runs): their sockets are
	// not captured. OutsideCgroupUnchecked says why they could not be looked for.
	OutsideCgroup          []int  `json:"outsideCgroup,omitempty"`
	OutsideCgroupUnchecked string `json:"outsideCgroupUnchecked,omitempty"`
	// Health is one line for an operator: "healthy", or "degraded: ..." / "defunct: ..."
	// / "iptables fallback: ..." with the reason and the fix (see Assess).
	Health string `json:"health"`
}

// ProgramStatus describes one attached program.
type ProgramStatus struct {
	Name      string `json:"name"`
	Attach    string `json:"attach"`
	LinkID    uint32 `json:"linkId"`
	ProgramID uint32 `json:"programId"`
	CgroupID  uint64 `json:"cgroupId,omitempty"`
	NetNSIno  uint64 `json:"netnsIno,omitempty"`
}

// Defunct reports whether the kernel detached the program because its cgroup or network
// namespace went away (the link then reports cgroup id 0, or netns inode 0).
func (p ProgramStatus) Defunct() bool {
	if p.Attach == "SkLookup" {
		return p.NetNSIno == 0
	}
	return p.CgroupID == 0
}

// PolicyStatus is the policy as the maps express it.
type PolicyStatus struct {
	ProxyPort            uint16       `json:"proxyPort"`
	InboundCapturePort   uint16       `json:"inboundCapturePort"`
	InboundTunnelPort    uint16       `json:"inboundTunnelPort"`
	ProxyUID             uint32       `json:"proxyUid"`
	ProxyGID             uint32       `json:"proxyGid"`
	OutboundIncludeAll   bool         `json:"outboundIncludeAll"`
	OutboundCIDRs        []string     `json:"outboundCidrs,omitempty"`
	OutboundExcludeCIDRs []string     `json:"outboundExcludeCidrs,omitempty"`
	OutboundPorts        []uint16     `json:"outboundPorts,omitempty"`
	OutboundExcludePorts []uint16     `json:"outboundExcludePorts,omitempty"`
	InboundIncludeAll    bool         `json:"inboundIncludeAll"`
	InboundPorts         []uint16     `json:"inboundPorts,omitempty"`
	InboundExcludePorts  []uint16     `json:"inboundExcludePorts,omitempty"`
	LocalAddrs           []netip.Addr `json:"localAddrs"`
	// IPv6 says native IPv6 is captured too (istio's ip6tables rules).
	IPv6 bool `json:"ipv6"`
	// DNS capture: off, to the nameservers, or (DNSCaptureAll) every destination's port 53,
	// sent to 127.0.0.1:DNSAgentPort.
	DNSCapture    bool         `json:"dnsCapture"`
	DNSCaptureAll bool         `json:"dnsCaptureAll,omitempty"`
	DNSServers    []netip.Addr `json:"dnsServers,omitempty"`
	DNSAgentPort  uint16       `json:"dnsAgentPort,omitempty"`
}

// Status reads an attached pod's programs, policy and counters.
func Status(id string, opts Options) (*PodStatus, error) {
	m, err := OpenMaps(id, opts)
	if err != nil {
		return nil, err
	}
	defer m.Close()

	st := &PodStatus{ID: id, Pod: readPodName(PinDir(opts, id)), Counters: map[string]uint64{},
		CountersByFamily: map[string]map[string]uint64{}}
	for _, p := range programs {
		info, err := pinnedLinkInfo(PinDir(opts, id), p)
		if err != nil {
			return nil, err
		}
		if info == nil {
			continue // that direction is turned off
		}
		ps := ProgramStatus{Name: p.name, Attach: p.attach.String(), LinkID: uint32(info.ID), ProgramID: uint32(info.Program)}
		if cg := info.Cgroup(); cg != nil {
			ps.CgroupID = cg.CgroupId
		}
		if ns := info.NetNs(); ns != nil {
			ps.NetNSIno = uint64(ns.NetnsInode)
		}
		st.Programs = append(st.Programs, ps)
	}
	if st.Policy, err = readPolicy(m); err != nil {
		return nil, err
	}
	if st.Inert, err = inert(m); err != nil {
		return nil, err
	}
	if st.Inert {
		st.Policy.OutboundExcludePorts, st.Policy.InboundExcludePorts = nil, nil
	}
	counters, err := maps.CountersByFamily(m)
	if err != nil {
		return nil, err
	}
	for f, byReason := range counters {
		st.CountersByFamily[f.String()] = map[string]uint64{}
		for r, n := range byReason {
			if n > 0 {
				st.Counters[r.String()] += n
				st.CountersByFamily[f.String()][r.String()] = n
			}
		}
	}
	drops, err := maps.Drops(m)
	if err != nil {
		return nil, err
	}
	st.Drops = make(map[string]uint64, len(drops))
	for d, n := range drops {
		st.Drops[d.String()] = n
	}
	if st.HasProgram("divert_sk_lookup") {
		slot, err := readSlot(PinDir(opts, id))
		if err != nil {
			return nil, err
		}
		listeners, base := m.InboundListeners, uint32(0)
		if slot != 0 {
			listeners, base = m.NodeListeners, slot*listenerSlots
		}
		n, err := countListeners(listeners, base)
		if err != nil {
			return nil, err
		}
		st.Listeners = &n
	}
	st.Assess()
	return st, nil
}

// readPolicy is the policy the maps hold (maps.ReadPolicy), as status shows it.
func readPolicy(m *maps.Maps) (PolicyStatus, error) {
	cfg, local, err := maps.ReadPolicy(m)
	if err != nil {
		return PolicyStatus{}, err
	}
	p := PolicyStatus{
		ProxyPort: cfg.ProxyPort, InboundCapturePort: cfg.InboundCapturePort, InboundTunnelPort: cfg.InboundTunnelPort,
		ProxyUID: cfg.ProxyUID, ProxyGID: cfg.ProxyGID,
		OutboundIncludeAll: cfg.OutboundCIDRs.All, InboundIncludeAll: cfg.InboundPorts.All,
		OutboundPorts: cfg.OutboundPorts, OutboundExcludePorts: cfg.OutboundExcludePorts,
		InboundPorts: cfg.InboundPorts.Ports, InboundExcludePorts: cfg.InboundExcludePorts,
		OutboundCIDRs: prefixStrings(cfg.OutboundCIDRs.Prefixes), OutboundExcludeCIDRs: prefixStrings(cfg.OutboundExcludeCIDRs),
		LocalAddrs: local, IPv6: cfg.IPv6,
		DNSCapture: cfg.RedirectDNS, DNSCaptureAll: cfg.CaptureAllDNS, DNSServers: cfg.DNSServers,
	}
	if p.DNSCapture {
		c, err := maps.ReadConfig(m) // the port the kernel sends queries to
		if err != nil {
			return p, fmt.Errorf("read config_map: %w", err)
		}
		p.DNSAgentPort = c.DnsAgentPort
	}
	return p, nil
}

func prefixStrings(prefixes []netip.Prefix) []string {
	var out []string
	for _, p := range prefixes {
		out = append(out, p.String())
	}
	return out
}

// pinnedLinkInfo reads the link p pinned in dir, or nil where there is none (that
// direction is turned off).
func pinnedLinkInfo(dir string, p program) (*link.Info, error) {
	l, err := loadPinnedLink(filepath.Join(dir, p.pin))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	info, err := l.Info()
	l.Close()
	if err != nil {
		return nil, fmt.Errorf("read %s link: %w", p.name, err)
	}
	return info, nil
}
