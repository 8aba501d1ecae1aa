// Package maps gives typed access to divert's BPF maps: it turns a policy.Config into map
// contents (Apply) and reads it back (ReadPolicy), with the counters and drops. One file
// over 400 lines on purpose: each map's writing and reading sit side by side, so a change
// to a map's layout is made in one place (issue 19, item 1).
package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

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
	// Each family's ranges go to its own tries, as istio renders them into its own table.
	for _, t := range []struct {
		name     string
		m        *ebpf.Map
		prefixes []netip.Prefix
		sync     func(*ebpf.Map, []netip.Prefix) error
	}{
		{"outbound_exclude_cidrs", m.OutboundExcludeCidrs, cfg.IPv4OutboundExcludeCIDRs(), syncPrefixes},
		{"outbound_include_cidrs", m.OutboundIncludeCidrs, cfg.IPv4OutboundCIDRs(), syncPrefixes},
		{"outbound_exclude_cidrs6", m.OutboundExcludeCidrs6, cfg.IPv6OutboundExcludeCIDRs(), syncPrefixes6},
		{"outbound_include_cidrs6", m.OutboundIncludeCidrs6, cfg.IPv6OutboundCIDRs(), syncPrefixes6},
	} {
		if err := t.sync(t.m, t.prefixes); err != nil {
			return fmt.Errorf("update %s map: %w", t.name, err)
		}
	}
	if err := syncAddrs(m.LocalAddrs, localAddrs); err != nil {
		return fmt.Errorf("update local_addrs map: %w", err)
	}
	if err := syncAddrs(m.DnsServers, cfg.DNSServers); err != nil {
		return fmt.Errorf("update dns_servers map: %w", err)
	}
	_, gids := cfg.OwnerGroupFilter()
	if err := syncIDs(m.OwnerGids, gids); err != nil {
		return fmt.Errorf("update owner_gids map: %w", err)
	}
	// The scalar settings go last: a new include-all flag must not run ahead of the sets.
	if err := m.ConfigMap.Put(uint32(0), configValue(cfg)); err != nil {
		return fmt.Errorf("update config_map: %w", err)
	}
	return nil
}

func configValue(cfg *policy.Config) bpf.DivertConfig {
	return bpf.DivertConfig{
		ProxyUid:            cfg.ProxyUID,
		ProxyGid:            cfg.ProxyGID,
		ProxyPort:           cfg.ProxyPort,
		InboundCapturePort:  cfg.InboundCapturePort,
		InboundTunnelPort:   cfg.InboundTunnelPort,
		OutboundIncludeAll:  boolByte(cfg.OutboundCIDRs.All),
		InboundIncludeAll:   boolByte(cfg.InboundPorts.All),
		CaptureLoopback:     boolByte(cfg.CapturesLoopback()),
		InboundTunnelPasses: boolByte(cfg.InboundTunnelPasses()),
		DnsCapture:          boolByte(cfg.CapturesDNS()),
		DnsCaptureAll:       boolByte(cfg.CaptureAllDNS),
		DnsAgentPort:        policy.DNSAgentPort,
		OwnerGroups:         ownerGroups(cfg),
		CaptureIpv6:         boolByte(cfg.IPv6),
	}
}

func ownerGroups(cfg *policy.Config) uint8 {
	switch only, gids := cfg.OwnerGroupFilter(); {
	case only:
		return uint8(bpf.DivertOwnerGroupsOWNER_GROUPS_ONLY)
	case len(gids) > 0:
		return uint8(bpf.DivertOwnerGroupsOWNER_GROUPS_NOT)
	}
	return uint8(bpf.DivertOwnerGroupsOWNER_GROUPS_ALL)
}

// syncIDs makes a set of ids (the owner groups' gids) hold exactly ids.
func syncIDs(m *ebpf.Map, ids []uint32) error {
	want := make(map[uint32]uint8, len(ids))
	for _, id := range ids {
		want[id] = 1
	}
	return sync(m, want)
}

// ReadConfig returns the settings stored in the config map.
func ReadConfig(m *Maps) (bpf.DivertConfig, error) {
	var c bpf.DivertConfig
	err := m.ConfigMap.Lookup(uint32(0), &c)
	return c, err
}

// ReadPolicy is Apply's inverse: the policy the maps express and the pod's own addresses
// (in address order), what the programs decide with, whatever any command line says.
// It gives back cfg as Apply rendered it: -d only with -b '*' (Config.InboundExcludes), -i
// and -x as their prefixes of both families (sorted as text, as divert status lists them),
// port lists and nameservers in order, owner groups sorted, REDIRECT or TPROXY by the one
// difference TPROXY makes to capture (Config.InboundTunnelPasses). What the maps do not
// hold, the TPROXY mark and route table and what eBPF does not render (-c, -k,
// --drop-invalid), is Default's.
func ReadPolicy(m *Maps) (policy.Config, []netip.Addr, error) {
	c, err := ReadConfig(m)
	if err != nil {
		return policy.Config{}, nil, fmt.Errorf("read config_map: %w", err)
	}
	var sets bpf.DivertPortSets
	if err := m.PortSetsMap.Lookup(uint32(0), &sets); err != nil {
		return policy.Config{}, nil, fmt.Errorf("read port_sets_map: %w", err)
	}
	cfg := policy.Default()
	cfg.ProxyPort, cfg.InboundCapturePort, cfg.InboundTunnelPort = c.ProxyPort, c.InboundCapturePort, c.InboundTunnelPort
	cfg.ProxyUID, cfg.ProxyGID = c.ProxyUid, c.ProxyGid
	cfg.Mode = policy.Redirect
	if c.InboundTunnelPasses == 0 {
		cfg.Mode = policy.TProxy
	}
	cfg.InboundPorts = policy.PortList{All: c.InboundIncludeAll != 0, Ports: Ports(&sets.InboundInclude)}
	cfg.InboundExcludePorts = Ports(&sets.InboundExclude)
	cfg.OutboundPorts = Ports(&sets.OutboundInclude)
	cfg.OutboundExcludePorts = Ports(&sets.OutboundExclude)
	cfg.OutboundCIDRs = policy.CIDRList{All: c.OutboundIncludeAll != 0}
	if cfg.OutboundCIDRs.Prefixes, err = readPrefixes(m.OutboundIncludeCidrs, m.OutboundIncludeCidrs6); err != nil {
		return policy.Config{}, nil, fmt.Errorf("read outbound_include_cidrs maps: %w", err)
	}
	if cfg.OutboundExcludeCIDRs, err = readPrefixes(m.OutboundExcludeCidrs, m.OutboundExcludeCidrs6); err != nil {
		return policy.Config{}, nil, fmt.Errorf("read outbound_exclude_cidrs maps: %w", err)
	}
	cfg.IPv6 = c.CaptureIpv6 != 0
	cfg.RedirectDNS, cfg.CaptureAllDNS = c.DnsCapture != 0, c.DnsCaptureAll != 0
	if cfg.DNSServers, err = readAddrs(m.DnsServers); err != nil {
		return policy.Config{}, nil, fmt.Errorf("read dns_servers map: %w", err)
	}
	gids, err := readSet(m.OwnerGids, func(id uint32) uint32 { return id })
	if err != nil {
		return policy.Config{}, nil, fmt.Errorf("read owner_gids map: %w", err)
	}
	slices.Sort(gids)
	switch bpf.DivertOwnerGroups(c.OwnerGroups) {
	case bpf.DivertOwnerGroupsOWNER_GROUPS_ONLY:
		cfg.OutboundOwnerGroups = policy.OwnerGroups{Only: true, Include: gids}
	case bpf.DivertOwnerGroupsOWNER_GROUPS_NOT:
		cfg.OutboundOwnerGroups = policy.OwnerGroups{Exclude: gids}
	}
	local, err := readAddrs(m.LocalAddrs)
	if err != nil {
		return policy.Config{}, nil, fmt.Errorf("read local_addrs map: %w", err)
	}
	return cfg, local, nil
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
	set(&sets.InboundExclude, cfg.InboundExcludes())
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
// What m holds is read by iterating, not by Lookup: in an LPM trie a lookup of 10.96.0.0/12
// finds 10.0.0.0/8, and the new prefix would never be put.
func sync[K comparable, V comparable](m *ebpf.Map, want map[K]V) error {
	have := map[K]V{}
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		have[k] = v
	}
	if err := it.Err(); err != nil {
		return err
	}
	for k, v := range want {
		if cur, ok := have[k]; ok && cur == v {
			continue
		}
		if err := m.Put(k, v); err != nil {
			return err
		}
	}
	var stale []K
	for k := range have {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
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

func syncPrefixes6(m *ebpf.Map, prefixes []netip.Prefix) error {
	want := make(map[bpf.DivertLpmV6Key]uint8, len(prefixes))
	for _, p := range prefixes {
		want[bpf.DivertLpmV6Key{Prefixlen: uint32(p.Bits()), Addr: InetAddrValue(p.Addr()).W}] = 1
	}
	return sync(m, want)
}

// readPrefixes is the inverse of syncPrefixes and syncPrefixes6: both families' tries,
// sorted as text.
func readPrefixes(m4, m6 *ebpf.Map) ([]netip.Prefix, error) {
	out, err := readSet(m4, func(k bpf.DivertLpmV4Key) netip.Prefix {
		return netip.PrefixFrom(AddrFromValue(k.Addr), int(k.Prefixlen))
	})
	if err != nil {
		return nil, err
	}
	out6, err := readSet(m6, func(k bpf.DivertLpmV6Key) netip.Prefix {
		return netip.PrefixFrom(inet16(bpf.DivertInetAddr{W: k.Addr}), int(k.Prefixlen))
	})
	out = append(out, out6...)
	slices.SortFunc(out, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return out, err
}

// readSet returns the keys of a set that sync wrote (each key's value is 1), as elem makes
// them.
func readSet[K, E any](m *ebpf.Map, elem func(K) E) ([]E, error) {
	var out []E
	var k K
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, elem(k))
	}
	return out, it.Err()
}

// syncAddrs makes a set of addresses (the pod's own, the nameservers) hold exactly addrs,
// both families.
func syncAddrs(m *ebpf.Map, addrs []netip.Addr) error {
	want := make(map[bpf.DivertInetAddr]uint8, len(addrs))
	for _, a := range addrs {
		want[InetAddrValue(a)] = 1
	}
	return sync(m, want)
}

// readAddrs is the inverse of syncAddrs, in address order.
func readAddrs(m *ebpf.Map) ([]netip.Addr, error) {
	out, err := readSet(m, InetAddrFromValue)
	slices.SortFunc(out, netip.Addr.Compare)
	return out, err
}

// AddrValue is an IPv4 address as the BPF side's IPv4 tries store it: network byte order
// in a __u32.
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

// InetAddrValue is an address of either family as the BPF side holds it (struct
// inet_addr): 16 bytes in network order, IPv4 as ::ffff:a.b.c.d.
func InetAddrValue(a netip.Addr) bpf.DivertInetAddr {
	b := a.Unmap().As16()
	var v bpf.DivertInetAddr
	for i := range v.W {
		v.W[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return v
}

// InetAddrFromValue is the inverse of InetAddrValue: IPv4 comes back as IPv4.
func InetAddrFromValue(v bpf.DivertInetAddr) netip.Addr { return inet16(v).Unmap() }

// inet16 is v's 16 bytes as an IPv6 address (a prefix of a v4-mapped range stays one).
func inet16(v bpf.DivertInetAddr) netip.Addr {
	var b [16]byte
	for i, w := range v.W {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	return netip.AddrFrom16(b)
}

// PortFromValue converts a port stored in network byte order.
func PortFromValue(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

// Family is the address family a verdict counter counts: IPv4 (dialled from dual-stack
// sockets as ::ffff:a.b.c.d too, IPv4 on the wire) or native IPv6.
type Family int

const (
	IPv4 Family = iota
	IPv6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// CountersByFamily sums the per-CPU verdict counters by family and reason.
func CountersByFamily(m *Maps) (map[Family]map[policy.Reason]uint64, error) {
	out := map[Family]map[policy.Reason]uint64{}
	// IPv4's counters fill the first half of the map, IPv6's the second (bpf/types.h's
	// FAMILY_COUNTERS).
	familyCounters := m.Counters.MaxEntries() / 2
	for _, f := range []Family{IPv4, IPv6} {
		out[f] = make(map[policy.Reason]uint64, policy.NumReasons)
		for _, r := range policy.Reasons() {
			var perCPU []uint64
			if err := m.Counters.Lookup(uint32(f)*familyCounters+uint32(r), &perCPU); err != nil {
				return nil, fmt.Errorf("read counters map: %w", err)
			}
			for _, n := range perCPU {
				out[f][r] += n
			}
		}
	}
	return out, nil
}

// Counters sums the per-CPU verdict counters by reason, both families together.
func Counters(m *Maps) (map[policy.Reason]uint64, error) {
	byFamily, err := CountersByFamily(m)
	if err != nil {
		return nil, err
	}
	out := byFamily[IPv4]
	for r, n := range byFamily[IPv6] {
		out[r] += n
	}
	return out, nil
}

// Drop names what the programs gave up on (bpf/types.h's enum drop), as status and
// metrics print it.
type Drop uint32

const (
	DropNoListener      = Drop(bpf.DivertDropDROP_NO_LISTENER)
	DropConnectNoMemory = Drop(bpf.DivertDropDROP_CONNECT_NO_MEMORY)
	DropOrigDstUnsent   = Drop(bpf.DivertDropDROP_ORIG_DST_UNSENT)
	DropOrigDstUnstored = Drop(bpf.DivertDropDROP_ORIG_DST_UNSTORED)
	// TPROXY mode: sockops could not write the proxy's original_src SYN down for sk_lookup,
	// which hands it to the proxy once more (docs/semantics.md).
	DropTransparentUnstored = Drop(bpf.DivertDropDROP_TRANSPARENT_UNSTORED)
	numDrops                = Drop(bpf.DivertDropNUM_DROPS)
)

var dropNames = [numDrops]string{
	DropNoListener:      "inbound-no-listener",
	DropConnectNoMemory: "connect-no-memory",
	DropOrigDstUnsent:   "orig-dst-unsent",
	DropOrigDstUnstored: "orig-dst-unstored",

	DropTransparentUnstored: "transparent-syn-unstored",
}

func (d Drop) String() string {
	if d < numDrops {
		return dropNames[d]
	}
	return fmt.Sprintf("drop(%d)", uint32(d))
}

// Drops sums the per-CPU give-up counters by kind; every kind is present, zero or not.
func Drops(m *Maps) (map[Drop]uint64, error) {
	out := make(map[Drop]uint64, numDrops)
	for d := Drop(0); d < numDrops; d++ {
		var perCPU []uint64
		if err := m.Drops.Lookup(uint32(d), &perCPU); err != nil {
			return nil, fmt.Errorf("read drops map: %w", err)
		}
		out[d] = 0
		for _, n := range perCPU {
			out[d] += n
		}
	}
	return out, nil
}
