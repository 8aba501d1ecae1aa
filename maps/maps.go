// Package maps gives typed access to divert's BPF maps: it turns a policy.Config into map
// contents, and reads counters and original-destination entries back.
package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/policy"
)

// Maps are one pod's maps. The field names are the C map names (bpf/divert.c).
type Maps = bpf.DivertMaps

// Apply makes the maps express cfg for a pod whose own addresses are localAddrs. It updates
// in place: entries that stay are not touched, so connections decided meanwhile see either
// the old or the new value of each set, never an empty one.
func Apply(m *Maps, cfg *policy.Config, localAddrs []netip.Addr) error {
	// One update replaces every port list at once.
	if err := m.PortSetsMap.Put(uint32(0), PortSets(cfg)); err != nil {
		return fmt.Errorf("update port_sets_map: %w", err)
	}
	if err := syncPrefixes(m.OutboundExcludeCidrs, cfg.IPv4OutboundExcludeCIDRs()); err != nil {
		return fmt.Errorf("update outbound_exclude_cidrs map: %w", err)
	}
	if err := syncPrefixes(m.OutboundIncludeCidrs, cfg.IPv4OutboundCIDRs()); err != nil {
		return fmt.Errorf("update outbound_include_cidrs map: %w", err)
	}
	if err := syncLocalAddrs(m.LocalAddrs, localAddrs); err != nil {
		return fmt.Errorf("update local_addrs map: %w", err)
	}
	// The scalar settings go last: a new include-all flag must not run ahead of the sets.
	if err := m.ConfigMap.Put(uint32(0), configValue(cfg)); err != nil {
		return fmt.Errorf("update config_map: %w", err)
	}
	return nil
}

func configValue(cfg *policy.Config) bpf.DivertConfig {
	return bpf.DivertConfig{
		ProxyUid:           cfg.ProxyUID,
		ProxyGid:           cfg.ProxyGID,
		ProxyPort:          cfg.ProxyPort,
		InboundCapturePort: cfg.InboundCapturePort,
		InboundTunnelPort:  cfg.InboundTunnelPort,
		OutboundIncludeAll: boolByte(cfg.OutboundCIDRs.All),
		InboundIncludeAll:  boolByte(cfg.InboundPorts.All),
		CaptureLoopback:    boolByte(cfg.CapturesLoopback()),
		// istio returns the tunnel port only in REDIRECT mode's nat chain.
		InboundTunnelPasses: boolByte(cfg.Mode != policy.TProxy),
	}
}

// ReadConfig returns the settings stored in the config map.
func ReadConfig(m *Maps) (bpf.DivertConfig, error) {
	var c bpf.DivertConfig
	err := m.ConfigMap.Lookup(uint32(0), &c)
	return c, err
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// PortSets renders cfg's port lists as the BPF side's bitmaps.
func PortSets(cfg *policy.Config) *bpf.DivertPortSets {
	var sets bpf.DivertPortSets
	set := func(bits *[1024]uint64, ports []uint16) {
		for _, p := range ports {
			bits[p>>6] |= 1 << (p & 63)
		}
	}
	set(&sets.OutboundExclude, cfg.OutboundExcludePorts)
	set(&sets.OutboundInclude, cfg.OutboundPorts)
	if cfg.InboundPorts.All {
		// -d only means something with -b '*', as in istio's rules.
		set(&sets.InboundExclude, cfg.InboundExcludePorts)
	}
	set(&sets.InboundInclude, cfg.InboundPorts.Ports)
	return &sets
}

// Ports lists the ports set in a bitmap, in order.
func Ports(bits *[1024]uint64) []uint16 {
	var out []uint16
	for i, word := range bits {
		for b := 0; word != 0; b++ {
			if word&1 != 0 {
				out = append(out, uint16(i*64+b))
			}
			word >>= 1
		}
	}
	return out
}

// sync makes m hold exactly want: it puts new or changed entries, then deletes stale ones.
func sync[K comparable, V comparable](m *ebpf.Map, want map[K]V) error {
	for k, v := range want {
		var cur V
		if err := m.Lookup(k, &cur); err == nil && cur == v {
			continue
		}
		if err := m.Put(k, v); err != nil {
			return err
		}
	}
	var stale []K
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

func syncPrefixes(m *ebpf.Map, prefixes []netip.Prefix) error {
	want := make(map[bpf.DivertLpmV4Key]uint8, len(prefixes))
	for _, p := range prefixes {
		want[bpf.DivertLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: AddrValue(p.Addr())}] = 1
	}
	return sync(m, want)
}

func syncLocalAddrs(m *ebpf.Map, addrs []netip.Addr) error {
	want := make(map[uint32]uint8, len(addrs))
	for _, a := range addrs {
		if a.Is4() {
			want[AddrValue(a)] = 1
		}
	}
	return sync(m, want)
}

// AddrValue is an IPv4 address as the BPF side stores it: network byte order in a __u32.
func AddrValue(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// AddrFromValue is the inverse of AddrValue.
func AddrFromValue(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// PortFromValue converts a port stored in network byte order.
func PortFromValue(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

// Counters sums the per-CPU verdict counters by reason.
func Counters(m *Maps) (map[policy.Reason]uint64, error) {
	out := make(map[policy.Reason]uint64, policy.NumReasons)
	for _, r := range policy.Reasons() {
		var perCPU []uint64
		if err := m.Counters.Lookup(uint32(r), &perCPU); err != nil {
			return nil, fmt.Errorf("read counters map: %w", err)
		}
		for _, n := range perCPU {
			out[r] += n
		}
	}
	return out, nil
}

// OrigDst is one remembered original destination: which connection, and where it was going.
type OrigDst struct {
	Client, Proxy netip.AddrPort
	Orig          netip.AddrPort
}

// OrigDsts lists the original-destination entries of live redirected connections.
func OrigDsts(m *Maps) ([]OrigDst, error) {
	var out []OrigDst
	var k bpf.DivertTuple
	var v bpf.DivertOrigDst
	it := m.OrigDstByTuple.Iterate()
	for it.Next(&k, &v) {
		out = append(out, OrigDst{
			Client: netip.AddrPortFrom(AddrFromValue(k.ClientAddr), k.ClientPort),
			Proxy:  netip.AddrPortFrom(AddrFromValue(k.ProxyAddr), k.ProxyPort),
			Orig:   netip.AddrPortFrom(AddrFromValue(v.Addr), PortFromValue(v.Port)),
		})
	}
	return out, it.Err()
}

// PendingOrigDsts counts entries waiting between connect and the source port assignment.
func PendingOrigDsts(m *Maps) (int, error) {
	n := 0
	var k uint64
	var v bpf.DivertOrigDst
	it := m.OrigDstByCookie.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}
