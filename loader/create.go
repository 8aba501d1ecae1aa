// Attach of a pod seen for the first time, with the node's programs.

package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// create attaches a pod anew with the node's programs (node.go): it takes a free slot, whose
// maps get its policy, inert, and are pinned in staging with the slot's number; its links
// are made and pinned there; its slot is written into the cgroup storage of its links; the
// pins move into place, and arm turns capture on.
func create(dir string, pod Pod, tgt target, cfg *policy.Config, addrs []netip.Addr, opts Options) (err error) {
	n, err := loadNode(opts)
	if err != nil {
		return err
	}
	defer n.Close()
	slot, err := allocSlot(n, opts)
	if err != nil {
		return err
	}
	own, err := slotMaps(n, slot)
	if err != nil {
		return err
	}
	defer closeMaps(own)
	if err := zeroCounters(own); err != nil {
		return err
	}
	pm := podMaps(own)
	// Pins go to a temporary directory that is renamed into place at the end, so a crash
	// or an error leaves either no pod directory or a complete one.
	tmp, err := os.MkdirTemp(stagingDir(opts), pod.ID+"-")
	if err != nil {
		return fmt.Errorf("create pin directory: %w", err)
	}
	step("staging dir")
	defer func() {
		if err != nil {
			err = errors.Join(err, detachDir(tmp))
		}
	}()
	if err := writeSlot(tmp, slot); err != nil {
		return err
	}
	for _, name := range podMapNames {
		if err := own[name].Pin(filepath.Join(tmp, name)); err != nil {
			return fmt.Errorf("pin map %s: %w", name, err)
		}
		step("pin map " + name)
	}
	if err := growOwnerGids(n, slot, pm, tmp, cfg, addrs); err != nil {
		return err
	}
	own["owner_gids"] = pm.OwnerGids // closed with the rest
	if err := maps.Apply(pm, cfg, addrs); err != nil {
		return err
	}
	// Inert until every link is pinned in place (crash.go).
	if err := disarm(pm); err != nil {
		return err
	}

	if pod.Name != "" {
		if err := writePodName(tmp, pod.Name); err != nil {
			return err
		}
	}
	if !opts.NoInbound {
		if _, err := adoptListeners(pod, cfg.InboundCapturePort, n.maps["node_listeners"], slot*listenerSlots); err != nil {
			return err
		}
	}
	var links []link.Link
	defer func() { closeLinks(links, err != nil) }()
	for _, p := range programs {
		if !p.wanted(opts) {
			continue
		}
		if err := attachAndPin(pod, n, slot, p, tmp, &links); err != nil {
			return err
		}
	}
	// The links made the pod's cgroup storage (zero: the programs pass); the slot tells
	// the programs whose maps are the pod's.
	if err := n.maps["pod_slot"].Update(tgt.cgroupID, slot, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("write the pod's slot into pod_slot: %w", err)
	}
	step("write slot")
	undoNet, err := syncReturnPath(pod.NetNS, cfg, opts, returnPathState{})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, undoNet())
		}
	}()
	if testHookBeforeCommit != nil {
		if err := testHookBeforeCommit(); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("move pins into %s: %w", dir, err)
	}
	step("commit")
	indexSlot(opts, slot, pod.ID)
	if err := arm(pm, cfg); err != nil {
		closeLinks(links, false)
		links = nil
		return errors.Join(err, detachDir(dir))
	}
	step("arm")
	return nil
}

// podMaps is a pod's own maps as package maps reads and writes them.
func podMaps(own map[string]*ebpf.Map) *maps.Maps {
	return &maps.Maps{
		ConfigMap: own["config_map"], Counters: own["counters"], DnsServers: own["dns_servers"],
		Drops: own["drops"], LocalAddrs: own["local_addrs"],
		OutboundExcludeCidrs: own["outbound_exclude_cidrs"], OutboundExcludeCidrs6: own["outbound_exclude_cidrs6"],
		OutboundIncludeCidrs: own["outbound_include_cidrs"], OutboundIncludeCidrs6: own["outbound_include_cidrs6"],
		OwnerGids: own["owner_gids"], PortSetsMap: own["port_sets_map"],
	}
}

// attachAndPin attaches p's node program (sk_lookup: the pod's own copy, loaded for its
// slot) to pod and pins the link in dir; the link is added to links first, so that the
// caller's undo closes it whatever fails after.
func attachAndPin(pod Pod, n *node, slot uint32, p program, dir string, links *[]link.Link) error {
	prog := n.progs[p.name]
	if p.attach == ebpf.AttachSkLookup {
		var err error
		if prog, err = podSkLookup(n, slot); err != nil {
			return err
		}
		defer prog.Close() // the link holds the program
	}
	l, err := p.attachTo(pod, prog)
	if err != nil {
		return err
	}
	*links = append(*links, l)
	step("attach " + p.name)
	if err := l.Pin(filepath.Join(dir, p.pin)); err != nil {
		return fmt.Errorf("pin %s link: %w", p.name, err)
	}
	step("pin " + p.name)
	return nil
}
