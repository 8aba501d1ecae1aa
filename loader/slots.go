// Pod slots of the node's programs: which slot a pod holds (a symlink in its pin
// directory), taking and filling slots, reusing their maps, and giving them back. Over 400
// lines as one file: every step of a slot's life keeps the same ordering rules for the
// outer maps (slot_config_map's entry in last and out first) and the same grace-period
// costs, which would be split apart across files.

package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// readSlot is the slot recorded in a pod's pin directory (a symlink to its number, as the
// pod name is), or 0 for a pod of the per-pod layout.
func readSlot(dir string) (uint32, error) {
	s, err := os.Readlink(filepath.Join(dir, slotPin))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil || v == 0 || v >= maxSlots {
		return 0, fmt.Errorf("pod slot %q in %s is not a slot", s, dir)
	}
	return uint32(v), nil
}

// Slots and their maps. Putting a map into an outer map (or taking it out) from user space
// waits for an RCU grace period (the kernel's maybe_wait_bpf_programs: ~15 ms here, most
// of an attach's wall time if paid eleven times per pod). So a slot keeps its maps when its
// pod goes and the next pod in it reuses them (rewritten by package maps, counters zeroed):
// no outer map changes. New slots are filled slotChunk at a time, one batch update per outer
// map (putInner), the batches at once from their own threads: a grace period or two per
// chunk. gc gives the maps of
// free slots back (gcSlots). A slot is taken while a pod directory (or a staged attach)
// records it (slotPin); the state lock serialises who takes one, and the slot index says
// which are taken without reading every pod directory.
const slotChunk = 8

// takenSlots are the slots the pod directories record, from the slot index when it names
// exactly the attached pods, else from every pod directory (the index is then made again).
// For a caller that holds the state lock.
func takenSlots(opts Options) (map[uint32]bool, error) {
	ids, err := List(opts)
	if err != nil {
		return nil, err
	}
	if taken, ok := readSlotIndex(opts, ids); ok {
		return taken, nil
	}
	taken := map[uint32]bool{}
	index := slotIndexDir(opts)
	if err := os.RemoveAll(index); err != nil {
		return nil, fmt.Errorf("remove the slot index: %w", err)
	}
	if err := mkdirPrivate(index); err != nil {
		return nil, err
	}
	for _, id := range ids {
		slot, err := readSlot(PinDir(opts, id))
		if err != nil {
			return nil, err
		}
		taken[slot] = true
		indexSlot(opts, slot, id)
	}
	return taken, nil
}

// The slot index, <bpffs>/divert_node/slots/, holds a symlink named "<slot>-<pod id>" for
// every attached pod (slot 0 for a pod of the per-pod layout), so an attach learns the
// taken slots from one directory listing, not a readlink in every pod's directory (7-16 ms
// at 1,000 pods). The pods' slot pins stay the truth: the index is trusted only while its
// names are exactly the attached pods, which an attach or detach killed halfway, gc, or a
// build without the index (on the same node during an upgrade) all break, and is then made
// again from the pods (takenSlots). Its names alone say all; the symlinks' targets are the
// pod ids, for people.
func slotIndexDir(opts Options) string { return filepath.Join(nodeDir(opts), "slots") }

// readSlotIndex returns the index's slots if its names are exactly the pods ids.
func readSlotIndex(opts Options, ids []string) (map[uint32]bool, bool) {
	entries, err := os.ReadDir(slotIndexDir(opts))
	if err != nil || len(entries) != len(ids) {
		return nil, false
	}
	want := make(map[string]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	taken := make(map[uint32]bool, len(ids))
	for _, e := range entries {
		slot, id, ok := parseSlotIndexName(e.Name())
		if !ok || !want[id] || slot != 0 && taken[slot] {
			return nil, false
		}
		delete(want, id)
		taken[slot] = true
	}
	return taken, true
}

func parseSlotIndexName(name string) (slot uint32, id string, ok bool) {
	num, id, ok := strings.Cut(name, "-")
	v, err := strconv.ParseUint(num, 10, 32)
	return uint32(v), id, ok && err == nil && v < maxSlots && validID(id)
}

// indexSlot adds the pod in slot to the index and unindexSlot takes it out, best effort: an
// index they fail to keep no longer names the attached pods and is made again.
func indexSlot(opts Options, slot uint32, id string) {
	_ = os.Symlink(id, filepath.Join(slotIndexDir(opts), fmt.Sprintf("%d-%s", slot, id)))
}

func unindexSlot(opts Options, id string) {
	entries, _ := os.ReadDir(slotIndexDir(opts))
	for _, e := range entries {
		if _, other, ok := parseSlotIndexName(e.Name()); ok && other == id {
			_ = os.Remove(filepath.Join(slotIndexDir(opts), e.Name()))
		}
	}
}

// innerIDs reads the map IDs at the given entries of outer maps, all at once; 0 for an
// empty entry (no map has ID 0). On Linux 6.1 every lookup of a map-in-map from user space
// also waits for an RCU grace period (maybe_wait_bpf_programs, which later kernels call on
// updates and deletes only; 6.12 does not wait): one after another, a slot's eleven maps
// cost eleven grace periods (~18 ms each in the 6.1 guest, microseconds on 6.12) and gc's
// walk of 1,024 slots 19 s. Concurrent lookups share their grace periods, as fillSlots'
// updates do.
func innerIDs(entries []outerEntry) ([]uint32, error) {
	ids := make([]uint32, len(entries))
	errs := make([]error, len(entries))
	limit := make(chan struct{}, innerLookupThreads)
	var wg sync.WaitGroup
	for i, e := range entries {
		limit <- struct{}{}
		wg.Go(func() {
			defer func() { <-limit }()
			err := e.outer.Lookup(e.slot, &ids[i])
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				ids[i], err = 0, nil
			}
			if err != nil {
				errs[i] = fmt.Errorf("read slot %d of %s: %w", e.slot, e.name, err)
			}
		})
	}
	wg.Wait()
	return ids, errors.Join(errs...)
}

// outerEntry is one slot's entry of one outer map (name for messages).
type outerEntry struct {
	outer *ebpf.Map
	name  string
	slot  uint32
}

// innerLookupThreads bounds innerIDs' concurrent lookups: each blocks a thread for a grace
// period where lookups wait.
const innerLookupThreads = 64

// filledSlots says which of slots have their maps in the outer maps (slot_config_map's
// entry goes in last and out first).
func filledSlots(configMap *ebpf.Map, slots []uint32) ([]bool, error) {
	entries := make([]outerEntry, len(slots))
	for i, s := range slots {
		entries[i] = outerEntry{configMap, "slot_config_map", s}
	}
	ids, err := innerIDs(entries)
	has := make([]bool, len(slots))
	for i, id := range ids {
		has[i] = id != 0
	}
	return has, err
}

// FilledSlots lists the node's slots that have their maps (taken or kept for the next
// pod), nil on a node without the node layout.
func FilledSlots(opts Options) ([]uint32, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(nodeMapsDir(opts), "slot_config_map"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer m.Close()
	all := make([]uint32, m.MaxEntries())
	for i := range all {
		all[i] = uint32(i)
	}
	has, err := filledSlots(m, all)
	if err != nil {
		return nil, err
	}
	var filled []uint32
	for i, s := range all {
		if has[i] {
			filled = append(filled, s)
		}
	}
	return filled, nil
}

// allocSlot takes the lowest free slot, filling it (and the next free ones, up to
// slotChunk) with maps if it has none, and empties its range of node_listeners. It looks
// free slots up two chunks at a time (innerIDs): the lowest is usually filled, and the
// rest cost no more grace periods where lookups wait for one, and microseconds elsewhere.
func allocSlot(n *node, opts Options) (uint32, error) {
	taken, err := takenSlots(opts)
	if err != nil {
		return 0, err
	}
	var slot uint32
	var fill []uint32
	next := uint32(1)
	for next < n.slotCount() && len(fill) < slotChunk {
		var batch []uint32
		for ; next < n.slotCount() && len(batch) < 2*slotChunk; next++ {
			if !taken[next] {
				batch = append(batch, next)
			}
		}
		has, err := filledSlots(n.maps["slot_config_map"], batch)
		if err != nil {
			return 0, err
		}
		for i, s := range batch {
			if len(fill) == slotChunk {
				break
			}
			if slot == 0 {
				slot = s
				if has[i] {
					break
				}
			}
			if !has[i] {
				fill = append(fill, s)
			}
		}
		if slot != 0 && len(fill) == 0 {
			break // the lowest free slot has its maps
		}
	}
	if slot == 0 {
		return 0, fmt.Errorf("no free pod slot: %d pods are attached with the node's programs", n.slotCount()-1)
	}
	if err := fillSlots(n, fill); err != nil {
		return 0, err
	}
	for i := slot * listenerSlots; i < (slot+1)*listenerSlots; i++ {
		// A sockmap answers EINVAL for an empty entry.
		if err := n.maps["node_listeners"].Delete(i); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) && !errors.Is(err, unix.EINVAL) {
			return 0, fmt.Errorf("empty node_listeners for slot %d: %w", slot, err)
		}
	}
	return slot, nil
}

// fillSlots gives each slot new maps of its own, every outer map update at once: the
// grace periods they wait for overlap. slot_config_map's entries go in last.
func fillSlots(n *node, slots []uint32) error {
	if len(slots) == 0 {
		return nil
	}
	spec, err := skLookupSpec() // its pod maps are divert.c's (TestPodMapsInSkLookupObject), and it parses in a fifth of the time
	if err != nil {
		return err
	}
	var made []*ebpf.Map
	defer func() {
		for _, m := range made {
			m.Close() // the outer maps hold them
		}
	}()
	// Per outer map, the slots' new inner maps: one batch update each, all outer maps at
	// once: a grace period per batch at most, not one per slot, and a dozen syscalls.
	inners := map[string][]uint32{}
	for range slots {
		for _, name := range podMapNames {
			ms := spec.Maps[name]
			if name == "owner_gids" {
				// Sized for what most policies hold (none): a hash's buckets cost memory
				// even empty (16 KiB for 1,024). growOwnerGids swaps in a bigger one when
				// a policy needs it; an inner hash may differ in size (Linux 5.10+).
				ms = ms.Copy()
				ms.MaxEntries = smallOwnerGids
			}
			m, err := ebpf.NewMap(ms)
			if err != nil {
				return fmt.Errorf("create map %s: %w", name, err)
			}
			made = append(made, m)
			inners[name] = append(inners[name], uint32(m.FD()))
		}
	}
	for _, batch := range [][]string{podMapNames[1:], {"config_map"}} {
		errs := make([]error, len(batch))
		var wg sync.WaitGroup
		for i, name := range batch {
			wg.Go(func() { errs[i] = putInner(n.maps["slot_"+name], slots, inners[name]) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("fill pod slots %v: %w", slots, err)
		}
	}
	return nil
}

// putInner puts inner maps (by fd) into outer at slots: one batch update where the kernel
// has them for an outer map (6.1 has, 5.10 answers "not supported": TestPutInner), else one
// update per slot, all at once so their grace periods overlap.
func putInner(outer *ebpf.Map, slots, fds []uint32) error {
	_, err := outer.BatchUpdate(slots, fds, nil)
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	errs := make([]error, len(slots))
	var wg sync.WaitGroup
	for i := range slots {
		wg.Go(func() { errs[i] = outer.Update(slots[i], fds[i], ebpf.UpdateAny) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// smallOwnerGids is the size a slot's owner_gids starts with.
const smallOwnerGids = 8

// growOwnerGids makes sure the owner_gids of the pod in slot (pm; pinned in dir) holds
// gids: if it is too small, a full-size one with cfg's policy replaces it, in the outer map
// (one grace period: rare) and in dir, before the caller's own maps.Apply.
func growOwnerGids(n *node, slot uint32, pm *maps.Maps, dir string, cfg *policy.Config, addrs []netip.Addr) error {
	_, gids := cfg.OwnerGroupFilter()
	if len(gids) <= int(pm.OwnerGids.MaxEntries()) {
		return nil
	}
	spec, err := skLookupSpec() // its pod maps are divert.c's (TestPodMapsInSkLookupObject), and it parses in a fifth of the time
	if err != nil {
		return err
	}
	big, err := ebpf.NewMap(spec.Maps["owner_gids"])
	if err != nil {
		return fmt.Errorf("create map owner_gids: %w", err)
	}
	defer big.Close()
	with := *pm
	with.OwnerGids = big
	if err := maps.Apply(&with, cfg, addrs); err != nil {
		return err
	}
	if err := n.maps["slot_owner_gids"].Update(slot, big, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("put owner_gids in slot %d: %w", slot, err)
	}
	tmp := filepath.Join(dir, "owner_gids_new")
	os.Remove(tmp)
	if err := big.Pin(tmp); err != nil {
		return fmt.Errorf("pin map owner_gids: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "owner_gids")); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("pin map owner_gids: %w", err)
	}
	old := pm.OwnerGids
	pm.OwnerGids, _ = big.Clone()
	old.Close()
	return nil
}

// slotMaps opens slot's maps from the outer maps, by name.
func slotMaps(n *node, slot uint32) (map[string]*ebpf.Map, error) {
	entries := make([]outerEntry, len(podMapNames))
	for i, name := range podMapNames {
		entries[i] = outerEntry{n.maps["slot_"+name], "slot_" + name, slot}
	}
	ids, err := innerIDs(entries)
	if err != nil {
		return nil, err
	}
	own := map[string]*ebpf.Map{}
	for i, name := range podMapNames {
		if ids[i] == 0 {
			closeMaps(own)
			return nil, fmt.Errorf("read slot %d of slot_%s: %w", slot, name, ebpf.ErrKeyNotExist)
		}
		m, err := ebpf.NewMapFromID(ebpf.MapID(ids[i]))
		if err != nil {
			closeMaps(own)
			return nil, fmt.Errorf("open slot %d's %s: %w", slot, name, err)
		}
		own[name] = m
	}
	return own, nil
}

func closeMaps(ms map[string]*ebpf.Map) {
	for _, m := range ms {
		m.Close()
	}
}

// zeroCounters empties a reused slot's counters and drops.
func zeroCounters(own map[string]*ebpf.Map) error {
	zero := make([]uint64, ebpf.MustPossibleCPU())
	for _, name := range []string{"counters", "drops"} {
		m := own[name]
		for k := range m.MaxEntries() {
			if err := m.Update(k, zero, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("zero %s: %w", name, err)
			}
		}
	}
	return nil
}

// gcSlots gives back the maps of the slots no pod holds, for a caller that holds the state
// lock: slot_config_map's entries go first (the slot is then unfilled), all at once.
func gcSlots(opts Options) error {
	if _, err := os.Stat(nodeMapsDir(opts)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	taken, err := takenSlots(opts)
	if err != nil {
		return err
	}
	outer := map[string]*ebpf.Map{}
	defer closeMaps(outer)
	for _, name := range podMapNames {
		m, err := ebpf.LoadPinnedMap(filepath.Join(nodeMapsDir(opts), "slot_"+name), nil)
		if err != nil {
			return fmt.Errorf("open node map slot_%s: %w", name, err)
		}
		outer[name] = m
	}
	var untaken []uint32
	for s := range outer["config_map"].MaxEntries() {
		if !taken[s] {
			untaken = append(untaken, s)
		}
	}
	has, err := filledSlots(outer["config_map"], untaken)
	if err != nil {
		return err
	}
	var free []uint32
	for i, s := range untaken {
		if has[i] {
			free = append(free, s)
		}
	}
	for _, batch := range [][]string{{"config_map"}, podMapNames[1:]} {
		var wg sync.WaitGroup
		errs := make([]error, len(batch)*len(free))
		for i, name := range batch {
			for j, s := range free {
				wg.Go(func() {
					if err := outer[name].Delete(s); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
						errs[i*len(free)+j] = fmt.Errorf("free slot %d of slot_%s: %w", s, name, err)
					}
				})
			}
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return err
		}
	}
	for _, s := range free {
		if err := os.Remove(filepath.Join(buildsDir(opts), buildTag(), slotSkLookupPin(s))); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("free slot %d's sk_lookup: %w", s, err)
		}
	}
	return nil
}

// writeSlot records a pod's slot in its pin directory.
func writeSlot(dir string, slot uint32) error {
	if err := os.Symlink(strconv.FormatUint(uint64(slot), 10), filepath.Join(dir, slotPin)); err != nil {
		return fmt.Errorf("record pod slot: %w", err)
	}
	return nil
}
