// The names bpf2go's structs give their fields, listed by hand instead of read by
// reflection: the maps by their names in the ELF (which are their pin names), the programs
// by theirs (the program table's). TestNameListsMatchGenerated fails when bpf2go's output
// gains, loses or reorders a map or program the lists do not, so none can be forgotten.

package loader

import (
	"slices"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/maps"
)

// field is one field of a bpf2go struct and its `ebpf` tag.
type field[T any] struct {
	name string
	ptr  **T
}

// mapFields lists m's maps in bpf.DivertMaps' order.
func mapFields(m *maps.Maps) []field[ebpf.Map] {
	return []field[ebpf.Map]{
		{"config_map", &m.ConfigMap},
		{"counters", &m.Counters},
		{"dns_servers", &m.DnsServers},
		{"drops", &m.Drops},
		{"inbound_listeners", &m.InboundListeners},
		{"local_addrs", &m.LocalAddrs},
		{"node_listeners", &m.NodeListeners},
		{"orig_dst_storage", &m.OrigDstStorage},
		{"outbound_exclude_cidrs", &m.OutboundExcludeCidrs},
		{"outbound_exclude_cidrs6", &m.OutboundExcludeCidrs6},
		{"outbound_include_cidrs", &m.OutboundIncludeCidrs},
		{"outbound_include_cidrs6", &m.OutboundIncludeCidrs6},
		{"owner_gids", &m.OwnerGids},
		{"pod_slot", &m.PodSlot},
		{"port_sets_map", &m.PortSetsMap},
		{"slot_config_map", &m.SlotConfigMap},
		{"slot_counters", &m.SlotCounters},
		{"slot_dns_servers", &m.SlotDnsServers},
		{"slot_drops", &m.SlotDrops},
		{"slot_local_addrs", &m.SlotLocalAddrs},
		{"slot_outbound_exclude_cidrs", &m.SlotOutboundExcludeCidrs},
		{"slot_outbound_exclude_cidrs6", &m.SlotOutboundExcludeCidrs6},
		{"slot_outbound_include_cidrs", &m.SlotOutboundIncludeCidrs},
		{"slot_outbound_include_cidrs6", &m.SlotOutboundIncludeCidrs6},
		{"slot_owner_gids", &m.SlotOwnerGids},
		{"slot_port_sets_map", &m.SlotPortSetsMap},
		{"trace_control_map", &m.TraceControlMap},
		{"trace_events", &m.TraceEvents},
		{"trace_owner", &m.TraceOwner},
		{"transparent_syns", &m.TransparentSyns},
	}
}

// podMapFields lists m's maps a pod pins in its own directory: all but the node-wide ones
// (trace.go), in mapFields' order.
func podMapFields(m *maps.Maps) []field[ebpf.Map] {
	var fs []field[ebpf.Map]
	for _, f := range mapFields(m) {
		if !nodeMaps[f.name] {
			fs = append(fs, f)
		}
	}
	return fs
}

// perPodLayoutMaps are the maps a pod attached by the per-pod layout (before the node's
// programs) has pinned in its directory.
var perPodLayoutMaps = append([]string{"inbound_listeners", "orig_dst_storage", "transparent_syns"}, podMapNames...)

// programFields lists p's programs in bpf.DivertPrograms' order.
func programFields(p *bpf.DivertPrograms) []field[ebpf.Program] {
	return []field[ebpf.Program]{
		{"divert_connect4", &p.DivertConnect4},
		{"divert_connect6", &p.DivertConnect6},
		{"divert_getpeername4", &p.DivertGetpeername4},
		{"divert_getpeername6", &p.DivertGetpeername6},
		{"divert_getsockopt", &p.DivertGetsockopt},
		{"divert_recvmsg4", &p.DivertRecvmsg4},
		{"divert_recvmsg6", &p.DivertRecvmsg6},
		{"divert_sendmsg4", &p.DivertSendmsg4},
		{"divert_sendmsg6", &p.DivertSendmsg6},
		{"divert_sk_lookup", &p.DivertSkLookup},
		{"divert_sk_lookup_static", &p.DivertSkLookupStatic},
		{"divert_sockops", &p.DivertSockops},
	}
}

// forEachMap calls fn with each of the pod's own maps m holds (nil fields and the node-wide
// maps are skipped) and its name.
func forEachMap(m *maps.Maps, fn func(name string, mp *ebpf.Map)) {
	for _, f := range podMapFields(m) {
		if *f.ptr != nil {
			fn(f.name, *f.ptr)
		}
	}
}

// forEachLoadMap is forEachMap with the node-wide maps m holds too: what programs are
// loaded with.
func forEachLoadMap(m *maps.Maps, fn func(name string, mp *ebpf.Map)) {
	for _, f := range mapFields(m) {
		if *f.ptr != nil {
			fn(f.name, *f.ptr)
		}
	}
}

// MapNames lists what a pod's pin directory holds besides its links and name: its own
// maps and its slot.
func MapNames() []string {
	return append(slices.Clone(podMapNames), slotPin)
}
