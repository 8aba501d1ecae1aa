package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// Crash safety. A loader killed at any point (SIGKILL, OOM, node reboot) must leave a pod
// captured whole or not at all, and the next Attach or Detach must finish the job:
//
//   - A link lives on after its process only if pinned, and five links cannot be pinned
//     in one step. So the programs go in inert: the pod's port sets exclude every port,
//     outbound and inbound, and every program lets every connection pass. One map update,
//     arm, turns capture on in both directions at once; disarm, the first step of Detach,
//     turns it off.
//   - Turning outbound on or off on an attached pod adds or removes connect4 and connect6,
//     two links: the maps go in with outbound alone inert (outboundInert), the links
//     change, then arm.
//   - An attach in progress pins into <bpffs>/divert_staging/ and renames into place; a
//     detach renames the pod's directory there before taking it apart. Anything found in
//     staging under the state lock belongs to a loader that died (they all hold the lock
//     while staging), so Attach, Detach and GC detach and remove it first.

// inertPortSets excludes every port in both directions: the programs pass everything.
func inertPortSets() *bpf.DivertPortSets {
	var s bpf.DivertPortSets
	for i := range s.OutboundExclude {
		s.OutboundExclude[i] = ^uint64(0)
		s.InboundExclude[i] = ^uint64(0)
	}
	return &s
}

// disarm stops capture in both directions at once, the programs staying attached.
func disarm(m *maps.Maps) error {
	if err := m.PortSetsMap.Put(uint32(0), inertPortSets()); err != nil {
		return fmt.Errorf("disarm: update port_sets_map: %w", err)
	}
	return nil
}

// arm starts capture in both directions at once, with cfg's port lists.
func arm(m *maps.Maps, cfg *policy.Config) error {
	if err := m.PortSetsMap.Put(uint32(0), maps.PortSets(cfg)); err != nil {
		return fmt.Errorf("arm: update port_sets_map: %w", err)
	}
	return nil
}

// outboundInert is cfg with every port excluded outbound: connect4 and connect6 let every
// connection pass, inbound is cfg's.
func outboundInert(cfg *policy.Config) *policy.Config {
	c := *cfg
	c.OutboundExcludePorts = make([]uint16, 1<<16)
	for i := range c.OutboundExcludePorts {
		c.OutboundExcludePorts[i] = uint16(i)
	}
	return &c
}

// disarmPinned disarms the pod whose pins are in dir. Without a pinned port_sets_map
// there is nothing to disarm: a detach already got past its links (they go before the
// pins).
func disarmPinned(dir string) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, "port_sets_map"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned map port_sets_map: %w", err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), inertPortSets()); err != nil {
		return fmt.Errorf("disarm: update port_sets_map: %w", err)
	}
	return nil
}

func inert(m *maps.Maps) (bool, error) {
	var sets bpf.DivertPortSets
	if err := m.PortSetsMap.Lookup(uint32(0), &sets); err != nil {
		return false, fmt.Errorf("read port_sets_map: %w", err)
	}
	return sets == *inertPortSets(), nil
}

// Inert reports whether pod id is attached but inert: its attach or detach was killed
// midway, and attaching it again finishes the job.
func Inert(id string, opts Options) (bool, error) {
	m, err := OpenMaps(id, opts)
	if err != nil {
		return false, err
	}
	defer m.Close()
	return inert(m)
}
