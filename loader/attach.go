// Attach, update in place and Detach: the orchestration (a new pod's attach in create.go).
// Each step that changes the kernel or the bpffs is a named crashpoint (step); the pins,
// programs and targets it works with are in pins.go, programs.go, upgrade.go and target.go,
// the node's programs and maps in node.go, pod slots in slots.go, arming in crash.go.

package loader

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// testHookBeforeCommit, when set by a test, runs after every link is attached and pinned
// and before the pins are moved into place, to prove a late failure leaves nothing behind.
var testHookBeforeCommit func() error

// Attach captures pod's traffic according to cfg. On a pod already attached it updates the
// maps in place and, where the running programs are not this build's, swaps in this build's
// without a gap in capture; pins whose links the kernel detached (see Defunct: an earlier
// sandbox of the pod) are replaced. On any
// error nothing is left changed: no pins, links or maps of a new pod remain.
//
// It refuses the root of the cgroup hierarchy (ErrCgroupRoot), and a cgroup or network
// namespace where another pod's divert programs run, on the cgroup, an ancestor or a
// descendant (a *CapturedError, ErrCaptured): the kernel would run both pods' programs for
// the same sockets, and the proxy would read the wrong original destination or none.
func Attach(ctx context.Context, pod Pod, cfg *policy.Config, opts Options) (err error) {
	if !validID(pod.ID) {
		return &InputError{Field: "pod-id", Value: pod.ID, Msg: badID}
	}
	if opts.NoInbound && opts.NoOutbound {
		return errors.New("nothing to attach: both directions are turned off (NoInbound and NoOutbound)")
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := CheckPolicy(cfg); err != nil {
		return err
	}
	if pod.Name != "" {
		if err := CheckPodName(pod.Name); err != nil {
			return err
		}
	}
	var tgt target
	if tgt.cgroupID, err = cgroupID(pod.Cgroup); err != nil {
		return err
	}
	if isCgroupRoot(pod.Cgroup) {
		return &InputError{Field: "cgroup", Value: pod.Cgroup, Msg: ErrCgroupRoot.Error() + "; pass the pod's own cgroup", Err: ErrCgroupRoot}
	}
	addrs, err := LocalAddrs(pod.NetNS)
	if err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Stat(pod.NetNS, &st); err != nil {
		return &InputError{Field: "netns", Value: pod.NetNS, Msg: err.Error()}
	}
	tgt.netnsIno = st.Ino
	unlock, err := lockState(opts)
	if err != nil {
		return err
	}
	defer unlock()

	if err := cleanStaging(opts); err != nil {
		return err
	}
	// Under the lock: two loaders sharing this bpffs cannot both pass.
	if err := checkOverlap(pod, opts); err != nil {
		return err
	}
	if cfg.IPv6 {
		// The proxy's IPv6 inbound passthrough source, as istio-iptables adds it; taken
		// away again if this attach fails (err is Attach's result).
		var added bool
		if added, err = addPassthrough6(pod.NetNS); err != nil {
			return err
		}
		if added {
			defer func() {
				if err != nil {
					err = errors.Join(err, removePassthrough6(pod.NetNS))
				}
			}()
			if addrs, err = LocalAddrs(pod.NetNS); err != nil { // ::6 is one now
				return err
			}
		}
	}
	dir := PinDir(opts, pod.ID)
	if _, err := os.Stat(dir); err == nil {
		// Pins an earlier sandbox of this pod left, with links the kernel detached when their
		// cgroup or netns went away, cannot be updated in place: they go, and the pod is
		// attached afresh.
		gone, err := Defunct(pod.ID, opts)
		if err != nil {
			return err
		}
		if len(gone) == 0 {
			return update(dir, pod, tgt, cfg, addrs, opts)
		}
		if err := teardown(opts, pod.ID); err != nil {
			return err
		}
	}
	return create(dir, pod, tgt, cfg, addrs, opts)
}

// closeLinks closes link handles; with detach, it undoes the attachments first. Detach is
// explicit because dropping the last reference (unpin, close) frees a link only later, from
// a kernel work item, and an undone attach must be gone by the time Attach returns.
func closeLinks(links []link.Link, detach bool) {
	for _, l := range links {
		if detach {
			l.Detach()
		}
		l.Close() // pinned links stay attached
	}
}

func update(dir string, pod Pod, tgt target, cfg *policy.Config, addrs []netip.Addr, opts Options) (err error) {
	pinned, err := loadPinnedMaps(dir)
	if errors.Is(err, os.ErrNotExist) {
		// A map this build has and the pod's pins lack (dns_servers came with DNS capture).
		return fmt.Errorf("pod %s: %w (%w)", pod.ID, ErrIncompatible, err)
	}
	if err != nil {
		return err
	}
	defer pinned.Close()
	if err := openNodeMaps(pinned, opts, true); err != nil {
		return err
	}

	// Check every pinned link before changing anything, so a mismatch changes nothing.
	existing := make(map[string]link.Link)
	running := make(map[string]ebpf.ProgramID)
	defer func() {
		for _, l := range existing {
			l.Close()
		}
	}()
	for _, p := range programs {
		l, err := loadPinnedLink(filepath.Join(dir, p.pin))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		existing[p.name] = l
		info, err := l.Info()
		if err != nil {
			return fmt.Errorf("read %s link: %w", p.name, err)
		}
		if !tgt.belongsTo(info) {
			return &InputError{Field: "cgroup", Value: pod.Cgroup, Msg: fmt.Sprintf("pod %s is attached to another cgroup or network namespace; detach it first", pod.ID)}
		}
		running[p.name] = info.Program
	}

	slot, err := readSlot(dir)
	if err != nil {
		return err
	}
	// The programs this update attaches or swaps in: the node's for a pod of the node
	// layout. A pod of the per-pod layout keeps its own programs: theirs use no cgroup
	// storage, so none of the node's may replace them (the kernel allocates the storage at
	// attach only), and its maps are rewritten in place.
	var n *node
	if slot != 0 {
		if n, err = loadNode(opts); err != nil {
			return err
		}
		defer n.Close()
	} else {
		if err := checkPinnedMaps(pinned); err != nil {
			return fmt.Errorf("pod %s: %w (%w)", pod.ID, ErrIncompatible, err)
		}
		for _, p := range programs {
			if _, ok := existing[p.name]; !ok && p.wanted(opts) {
				return fmt.Errorf("pod %s: %w (attached by the per-pod layout, which cannot turn %s on: detach and attach it again)", pod.ID, ErrIncompatible, p.name)
			}
		}
	}
	listeners, base := pinned.InboundListeners, uint32(0)
	if slot != 0 {
		listeners, base = pinned.NodeListeners, slot*listenerSlots
	}
	// Turning outbound on or off adds or removes connect4 and connect6 one at a time: the
	// maps go in with outbound inert, and arm turns it on once both are in (crash.go).
	outChange := false
	for _, p := range programs {
		if _, has := existing[p.name]; p.outbound && !p.inbound && has != p.wanted(opts) {
			outChange = true
		}
	}
	applied := cfg
	if outChange {
		applied = outboundInert(cfg)
	}
	// TPROXY's return path before the maps, so that failing to set it up changes nothing.
	had, err := hadReturnPath(pinned, existing)
	if err != nil {
		return fmt.Errorf("pod %s: %w", pod.ID, err)
	}
	undoNet, err := syncReturnPath(pod.NetNS, cfg, opts, had)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, undoNet())
		}
	}()
	if slot != 0 {
		if err := growOwnerGids(n, slot, pinned, dir, applied, addrs); err != nil {
			return err
		}
	}
	if err := maps.Apply(pinned, applied, addrs); err != nil {
		return err
	}
	step("apply maps")
	if !opts.NoInbound {
		// Also after a change of -z: the listeners on the new port were never registered.
		if _, err := adoptListeners(pod, cfg.InboundCapturePort, listeners, base); err != nil {
			return err
		}
	}
	// Programs this attach turns on are attached and pinned first (undone on error); then
	// link.Update swaps the running ones atomically, so no connection escapes an upgrade;
	// programs turned off go last.
	var added []link.Link
	defer func() { closeLinks(added, err != nil) }()
	for _, p := range programs {
		if _, ok := existing[p.name]; ok || !p.wanted(opts) {
			continue
		}
		if err := attachAndPin(pod, n, slot, p, dir, &added); err != nil {
			return err
		}
	}
	if n != nil {
		if err := swapPrograms(existing, running, n, slot, opts); err != nil {
			return err
		}
	}
	for _, p := range slices.Backward(programs) {
		if l, ok := existing[p.name]; ok && !p.wanted(opts) {
			if err := detachPinned(l, filepath.Join(dir, p.pin)); err != nil {
				return fmt.Errorf("turn off %s: %w", p.name, err)
			}
			step("turn off " + p.name)
		}
	}
	if outChange {
		if err := arm(pinned, cfg); err != nil {
			return err
		}
		step("arm")
	}
	if pod.Name != "" {
		return writePodName(dir, pod.Name)
	}
	return nil
}

func detachPinned(l link.Link, pin string) error {
	if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	return os.Remove(pin)
}

// Detach removes everything Attach made for the pod. Unpinning the links detaches the
// programs; the maps go with their last reference.
func Detach(id string, opts Options) error {
	if !validID(id) {
		return &InputError{Field: "pod-id", Value: id, Msg: badID}
	}
	unlock, err := lockState(opts)
	if err != nil {
		return err
	}
	defer unlock()
	if err := cleanStaging(opts); err != nil {
		return err
	}
	dir := PinDir(opts, id)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	return teardown(opts, id)
}
