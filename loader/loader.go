// Package loader attaches divert to one pod: the cgroup programs to the pod's cgroup v2
// directory, with every map and link pinned under <bpffs>/divert/<pod id>/ so capture
// outlives the loader (init-container mode) and a later run can update or remove it.
//
// Attach is all-or-nothing and Detach removes exactly what Attach made. The loader knows
// cgroups, network namespaces and policy; nothing about Kubernetes.
package loader

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/internal/crashpoint"
	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// DefaultBPFFS is where bpffs is expected (and mounted if nothing is there).
const DefaultBPFFS = "/sys/fs/bpf"

var (
	// ErrNotAttached is returned by Detach and Status for a pod with no pins.
	ErrNotAttached = errors.New("not attached")
)

// InputError is a problem with what the caller asked for, named by the setting at fault
// (the CLI flag of the same name), so it can be reported in one line with the fix.
type InputError struct {
	Field string // "pod-id", "cgroup", "netns", "bpffs"
	Value string
	Msg   string
}

func (e *InputError) Error() string {
	return fmt.Sprintf("invalid --%s %q: %s", e.Field, e.Value, e.Msg)
}

// Pod is what the loader needs to know about a pod.
type Pod struct {
	// ID names the pod's pin directory; letters, digits, '_' and '-'.
	ID string
	// Cgroup is the pod's cgroup v2 directory; every process of the pod is at or below it.
	Cgroup string
	// NetNS is a path to the pod's network namespace, read for the pod's own addresses.
	NetNS string
}

// Options tune what is attached and where state lives.
type Options struct {
	// BPFFS is the bpffs mount to pin under; DefaultBPFFS if empty.
	BPFFS string
	// NoOutbound leaves outbound connections alone (no connect4 program).
	NoOutbound bool
	// NoInbound leaves inbound connections alone (no sk_lookup program).
	NoInbound bool
}

func (o Options) root() string {
	if o.BPFFS == "" {
		return DefaultBPFFS
	}
	return o.BPFFS
}

// stagingDir holds pins of an attach in progress, next to (not in) the pod directories.
func stagingDir(opts Options) string { return filepath.Join(opts.root(), "divert_staging") }

// PinDir is the directory that holds a pod's pins.
func PinDir(opts Options, id string) string { return filepath.Join(opts.root(), "divert", id) }

// program is one attached program: its name in the collection, how it attaches, the name of
// its link's pin, and which directions need it. The order is the attach order: the programs
// that answer for a redirected connection go in before the ones that start redirecting.
type program struct {
	name              string
	attach            ebpf.AttachType
	pin               string
	inbound, outbound bool
}

var programs = []program{
	{"divert_getsockopt", ebpf.AttachCGroupGetsockopt, "link_getsockopt", true, true},
	{"divert_sockops", ebpf.AttachCGroupSockOps, "link_sockops", true, true},
	{"divert_sk_lookup", ebpf.AttachSkLookup, "link_sk_lookup", true, false},
	// DNS capture: the hooks that show the app its nameserver go in before the ones that
	// send its queries to the agent.
	{"divert_recvmsg4", ebpf.AttachCGroupUDP4Recvmsg, "link_recvmsg4", false, true},
	{"divert_recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, "link_recvmsg6", false, true},
	{"divert_getpeername4", ebpf.AttachCgroupInet4GetPeername, "link_getpeername4", false, true},
	{"divert_getpeername6", ebpf.AttachCgroupInet6GetPeername, "link_getpeername6", false, true},
	{"divert_connect4", ebpf.AttachCGroupInet4Connect, "link_connect4", false, true},
	{"divert_connect6", ebpf.AttachCGroupInet6Connect, "link_connect6", false, true},
	{"divert_sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, "link_sendmsg4", false, true},
	{"divert_sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, "link_sendmsg6", false, true},
}

// wanted reports whether opts need the program.
func (p program) wanted(opts Options) bool {
	return (p.inbound && !opts.NoInbound) || (p.outbound && !opts.NoOutbound)
}

// attachTo attaches the program to the pod: sk_lookup to its network namespace, the rest
// to its cgroup.
func (p program) attachTo(pod Pod, prog *ebpf.Program) (link.Link, error) {
	var l link.Link
	var err error
	if p.attach == ebpf.AttachSkLookup {
		var ns *os.File
		if ns, err = os.Open(pod.NetNS); err == nil {
			l, err = link.AttachNetNs(int(ns.Fd()), prog)
			ns.Close()
		}
	} else {
		l, err = link.AttachCgroup(link.CgroupOptions{Path: pod.Cgroup, Attach: p.attach, Program: prog})
	}
	if err != nil {
		return nil, attachError(p, pod, err)
	}
	return l, nil
}

// target identifies what a pod's links must be attached to.
type target struct{ cgroupID, netnsIno uint64 }

// belongsTo checks a pinned link is attached where this pod's links must be.
func (t target) belongsTo(info *link.Info) bool {
	if cg := info.Cgroup(); cg != nil {
		return cg.CgroupId == t.cgroupID
	}
	if ns := info.NetNs(); ns != nil {
		return uint64(ns.NetnsInode) == t.netnsIno
	}
	return false
}

// objects is what gets loaded: the programs and maps, not bpf2go's variables (they only
// exist to carry types into BTF, and would cost a .bss map per pod).
type objects struct {
	bpf.DivertPrograms
	bpf.DivertMaps
}

func (o *objects) program(name string) *ebpf.Program {
	return reflectByTag[*ebpf.Program](&o.DivertPrograms, name)
}

// bpffs refuses '.' anywhere in a name, so ids cannot have one.
// testHookBeforeCommit, when set by a test, runs after every link is attached and pinned
// and before the pins are moved into place, to prove a late failure leaves nothing behind.
var testHookBeforeCommit func() error

// step names a change Attach or Detach just made to the kernel or the bpffs: the crash
// tests kill the process there (internal/crashpoint).
func step(name string) { crashpoint.Step(name) }

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`)

const badID = "use 1-128 letters, digits, '_' or '-' (bpffs forbids '.'), starting with a letter or digit"

// Attach captures pod's traffic according to cfg. On a pod already attached it updates the
// maps in place and, where the running programs are not this build's, swaps in this build's
// without a gap in capture. On any
// error nothing is left changed: no pins, links or maps of a new pod remain.
//
// It refuses the root of the cgroup hierarchy (ErrCgroupRoot), and a cgroup or network
// namespace where another pod's divert programs run, on the cgroup, an ancestor or a
// descendant (a *CapturedError, ErrCaptured): the kernel would run both pods' programs for
// the same sockets, and the proxy would read the wrong original destination or none.
func Attach(ctx context.Context, pod Pod, cfg *policy.Config, opts Options) error {
	if !validID.MatchString(pod.ID) {
		return &InputError{"pod-id", pod.ID, badID}
	}
	if opts.NoInbound && opts.NoOutbound {
		return errors.New("nothing to attach: both directions are turned off; drop --no-inbound or --no-outbound")
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	var tgt target
	var err error
	if tgt.cgroupID, err = cgroupID(pod.Cgroup); err != nil {
		return err
	}
	if isCgroupRoot(pod.Cgroup) {
		return fmt.Errorf("invalid --cgroup %q: %w; pass the pod's own cgroup", pod.Cgroup, ErrCgroupRoot)
	}
	addrs, err := LocalAddrs(pod.NetNS)
	if err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Stat(pod.NetNS, &st); err != nil {
		return &InputError{"netns", pod.NetNS, err.Error()}
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
	dir := PinDir(opts, pod.ID)
	if _, err := os.Stat(dir); err == nil {
		return update(dir, pod, tgt, cfg, addrs, opts)
	}
	return create(dir, pod, cfg, addrs, opts)
}

func create(dir string, pod Pod, cfg *policy.Config, addrs []netip.Addr, opts Options) (err error) {
	var objs objects
	if err := loadObjects(&objs, nil); err != nil {
		return err
	}
	defer closeAll(&objs)
	if err := maps.Apply(&objs.DivertMaps, cfg, addrs); err != nil {
		return err
	}
	// Inert until every link is pinned in place (crash.go).
	if err := disarm(&objs.DivertMaps); err != nil {
		return err
	}
	if !opts.NoInbound {
		if _, err := adoptListeners(pod, cfg.InboundCapturePort, objs.InboundListeners); err != nil {
			return err
		}
	}

	// Pins go to a temporary directory that is renamed into place at the end, so a crash
	// or an error leaves either no pod directory or a complete one.
	tmp, err := os.MkdirTemp(stagingDir(opts), pod.ID+"-")
	if err != nil {
		return fmt.Errorf("create pin directory: %w", err)
	}
	step("staging dir")
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := pinMaps(&objs.DivertMaps, tmp); err != nil {
		return err
	}
	var links []link.Link
	defer func() { closeLinks(links, err != nil) }()
	for _, p := range programs {
		if !p.wanted(opts) {
			continue
		}
		l, err := p.attachTo(pod, objs.program(p.name))
		if err != nil {
			return err
		}
		links = append(links, l)
		step("attach " + p.name)
		if err := l.Pin(filepath.Join(tmp, p.pin)); err != nil {
			return fmt.Errorf("pin %s link: %w", p.name, err)
		}
		step("pin " + p.name)
	}
	if testHookBeforeCommit != nil {
		if err := testHookBeforeCommit(); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("move pins into %s: %w", dir, err)
	}
	step("commit")
	if err := arm(&objs.DivertMaps, cfg); err != nil {
		closeLinks(links, false)
		links = nil
		return errors.Join(err, detachDir(dir))
	}
	step("arm")
	return nil
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
		return fmt.Errorf("pod %s was attached by an incompatible divert version (%w); run divert detach --pod-id %s first", pod.ID, err, pod.ID)
	}
	if err != nil {
		return err
	}
	defer closeMaps(pinned)

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
			return &InputError{"cgroup", pod.Cgroup, fmt.Sprintf("pod %s is attached to another cgroup or network namespace; run divert detach --pod-id %s first", pod.ID, pod.ID)}
		}
		running[p.name] = info.Program
	}

	// The programs are loaded (and verified) only when something needs them: one to attach,
	// or a running one that is not this build's. A re-attach with the programs in place,
	// the node agent's refresh of every pod when it starts, rewrites the maps only.
	var objs objects
	defer closeAll(&objs)
	current := false
	loadErr := checkPinnedMaps(pinned)
	if loadErr == nil {
		if current = programsCurrent(running, pinned, opts); !current {
			loadErr = loadObjects(&objs, pinned)
		}
	}
	if loadErr != nil {
		return fmt.Errorf("pod %s was attached by an incompatible divert version (%w); run divert detach --pod-id %s first", pod.ID, loadErr, pod.ID)
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
	if err := maps.Apply(pinned, applied, addrs); err != nil {
		return err
	}
	step("apply maps")
	if !opts.NoInbound {
		// Also after a change of -z: the listeners on the new port were never registered.
		if _, err := adoptListeners(pod, cfg.InboundCapturePort, pinned.InboundListeners); err != nil {
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
		l, err := p.attachTo(pod, objs.program(p.name))
		if err != nil {
			return err
		}
		added = append(added, l)
		step("attach " + p.name)
		if err := l.Pin(filepath.Join(dir, p.pin)); err != nil {
			return fmt.Errorf("pin %s link: %w", p.name, err)
		}
		step("pin " + p.name)
	}
	for _, p := range programs {
		if l, ok := existing[p.name]; ok && p.wanted(opts) && !current {
			if err := l.Update(objs.program(p.name)); err != nil {
				return fmt.Errorf("replace %s program: %w", p.name, err)
			}
			step("swap " + p.name)
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
	if !validID.MatchString(id) {
		return &InputError{"pod-id", id, badID}
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
	// Capture stops in both directions at once, then the pins move aside: a kill after
	// either leaves the pod uncaptured, and the next run finishes (crash.go).
	if err := disarmPinned(dir); err != nil {
		return fmt.Errorf("pod %s: %w", id, err)
	}
	step("disarm")
	retired, err := retireDir(opts, id)
	if err != nil {
		return err
	}
	step("retire")
	if err := detachDir(retired); err != nil {
		return fmt.Errorf("pod %s: %w", id, err)
	}
	return nil
}

// List returns the ids of attached pods. A BPFFS that is not a bpffs mount is an
// InputError (see readableRoot).
func List(opts Options) ([]string, error) {
	if mounted, err := readableRoot(opts); !mounted {
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(opts.root(), "divert"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && validID.MatchString(e.Name()) {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// OpenMaps opens the pinned maps of an attached pod; the caller closes them (CloseMaps).
func OpenMaps(id string, opts Options) (*maps.Maps, error) {
	if mounted, err := readableRoot(opts); !mounted && err != nil {
		return nil, err
	}
	dir := PinDir(opts, id)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	return loadPinnedMaps(dir)
}

// CloseMaps closes maps opened by OpenMaps.
func CloseMaps(m *maps.Maps) { closeMaps(m) }

// parsedSpec is the embedded collection, parsed once per process: parsing the ELF is the
// same work for every pod (a node agent attaches hundreds).
var parsedSpec = sync.OnceValues(bpf.LoadDivert)

// divertSpec returns a copy of the embedded collection spec for one load: cilium/ebpf does
// not promise that loading leaves a spec as it was, and loads may run concurrently (Probe
// takes no lock).
func divertSpec() (*ebpf.CollectionSpec, error) {
	spec, err := parsedSpec()
	if err != nil {
		return nil, err
	}
	return spec.Copy(), nil
}

// loadedTags holds the kernel's tags of the programs this process loaded, by program name:
// the tags of this build's programs on this kernel. The kernel computes a tag from the
// instructions with map references blanked, so it is the same for every pod.
var loadedTags struct {
	sync.Mutex
	byName map[string]string
}

// rememberTags records the tags of freshly loaded programs, for programsCurrent, once:
// every load of this build on this kernel gets the same ones.
func rememberTags(o *objects) {
	loadedTags.Lock()
	known := loadedTags.byName != nil
	loadedTags.Unlock()
	if known {
		return
	}
	tags := make(map[string]string, len(programs))
	for _, p := range programs {
		info, err := o.program(p.name).Info()
		if err != nil {
			return // then updates keep loading the programs, as if nothing were known
		}
		tags[p.name] = info.Tag
	}
	loadedTags.Lock()
	loadedTags.byName = tags
	loadedTags.Unlock()
}

// programsCurrent reports whether every program opts want runs already, as this build's
// code on the pod's own pinned maps: the tag of its instructions is the one this process
// got loading them, and every map it uses is one of the pinned ones. Then swapping in a
// fresh copy would change nothing but program ids. Anything unknown answers false (load
// and swap, as always), so the first update in a process loads the programs.
func programsCurrent(running map[string]ebpf.ProgramID, pinned *maps.Maps, opts Options) bool {
	loadedTags.Lock()
	tags := loadedTags.byName
	loadedTags.Unlock()
	if tags == nil {
		return false
	}
	mapIDs := map[ebpf.MapID]bool{}
	ok := true
	forEachMap(pinned, func(_ string, m *ebpf.Map) {
		info, err := m.Info()
		if err != nil {
			ok = false
			return
		}
		id, has := info.ID()
		ok = ok && has
		mapIDs[id] = true
	})
	if !ok {
		return false
	}
	for _, p := range programs {
		if !p.wanted(opts) {
			continue
		}
		id, attached := running[p.name]
		if !attached {
			return false // to be attached: that needs the program
		}
		prog, err := ebpf.NewProgramFromID(id)
		if err != nil {
			return false
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil || tags[p.name] == "" || info.Tag != tags[p.name] {
			return false
		}
		used, has := info.MapIDs()
		if !has {
			return false
		}
		for _, id := range used {
			if !mapIDs[id] {
				return false
			}
		}
	}
	return true
}

// checkPinnedMaps checks that pinned maps have the layout this build's programs expect,
// as loading the programs with them would.
func checkPinnedMaps(pinned *maps.Maps) error {
	spec, err := parsedSpec()
	if err != nil {
		return fmt.Errorf("load embedded BPF spec: %w", err)
	}
	forEachMap(pinned, func(name string, m *ebpf.Map) {
		if ms := spec.Maps[name]; err == nil && ms != nil {
			if cerr := ms.Compatible(m); cerr != nil {
				err = fmt.Errorf("using replacement map %s: %w", name, cerr)
			}
		}
	})
	return err
}

func loadObjects(objs *objects, pinned *maps.Maps) error {
	// Kernels before 5.11 charge BPF objects to RLIMIT_MEMLOCK (64 KiB by default before
	// 5.16): lift it. On newer kernels (memcg accounting) this does nothing.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("raise RLIMIT_MEMLOCK for BPF maps (needs CAP_SYS_RESOURCE on kernels before 5.11): %w", err)
	}
	spec, err := divertSpec()
	if err != nil {
		return fmt.Errorf("load embedded BPF spec: %w", err)
	}
	var opts ebpf.CollectionOptions
	if pinned != nil {
		opts.MapReplacements = map[string]*ebpf.Map{}
		forEachMap(pinned, func(name string, m *ebpf.Map) { opts.MapReplacements[name] = m })
	}
	if err := spec.LoadAndAssign(objs, &opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return fmt.Errorf("kernel rejected divert's programs: %v", verr) // one line; %+v has the log
		}
		return fmt.Errorf("load BPF programs: %w", err)
	}
	rememberTags(objs)
	return nil
}

func pinMaps(m *maps.Maps, dir string) (err error) {
	forEachMap(m, func(name string, mp *ebpf.Map) {
		if err == nil {
			if perr := mp.Pin(filepath.Join(dir, name)); perr != nil {
				err = fmt.Errorf("pin map %s: %w", name, perr)
				return
			}
			step("pin map " + name)
		}
	})
	return err
}

func loadPinnedMaps(dir string) (*maps.Maps, error) {
	m := &maps.Maps{}
	var err error
	v := reflect.ValueOf(m).Elem()
	for i := range v.NumField() {
		name := v.Type().Field(i).Tag.Get("ebpf")
		if name == "" {
			continue
		}
		mp, lerr := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if lerr != nil {
			err = fmt.Errorf("open pinned map %s: %w", name, lerr)
			break
		}
		v.Field(i).Set(reflect.ValueOf(mp))
	}
	if err != nil {
		closeMaps(m)
		return nil, err
	}
	return m, nil
}

func loadPinnedLink(path string) (link.Link, error) {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return nil, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	return l, nil
}

func forEachMap(m *maps.Maps, fn func(name string, mp *ebpf.Map)) {
	v := reflect.ValueOf(m).Elem()
	for i := range v.NumField() {
		name := v.Type().Field(i).Tag.Get("ebpf")
		if mp, ok := v.Field(i).Interface().(*ebpf.Map); ok && name != "" && mp != nil {
			fn(name, mp)
		}
	}
}

// MapNames lists the pinned map names, in struct order.
func MapNames() []string {
	var names []string
	t := reflect.TypeFor[maps.Maps]()
	for i := range t.NumField() {
		if name := t.Field(i).Tag.Get("ebpf"); name != "" {
			names = append(names, name)
		}
	}
	return names
}

func reflectByTag[T any](structPtr any, tag string) T {
	v := reflect.ValueOf(structPtr).Elem()
	for i := range v.NumField() {
		if v.Type().Field(i).Tag.Get("ebpf") == tag {
			return v.Field(i).Interface().(T)
		}
	}
	var zero T
	return zero
}

func closeMaps(m *maps.Maps) { forEachMap(m, func(_ string, mp *ebpf.Map) { mp.Close() }) }

func closeAll(o *objects) {
	closeMaps(&o.DivertMaps)
	for _, p := range programs {
		if prog := o.program(p.name); prog != nil {
			prog.Close()
		}
	}
}

func attachError(p program, pod Pod, err error) error {
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("attach %s to cgroup %s: this kernel lacks cgroup BPF %s support (%v); use --mode iptables", p.name, pod.Cgroup, p.attach, err)
	}
	return fmt.Errorf("attach %s to cgroup %s: %w", p.name, pod.Cgroup, err)
}

// cgroupID checks that path is a cgroup v2 directory and returns its id (the inode number).
func cgroupID(path string) (uint64, error) {
	if path == "" {
		return 0, &InputError{"cgroup", path, "required: the pod's cgroup v2 directory"}
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, &InputError{"cgroup", path, fmt.Sprintf("%v; pass the pod's cgroup v2 directory", unwrapPathError(err))}
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, &InputError{"cgroup", path, "not on a cgroup v2 file system; pass a directory under the cgroup2 mount (see /proc/mounts)"}
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, &InputError{"cgroup", path, unwrapPathError(err).Error()}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return 0, &InputError{"cgroup", path, "not a directory; pass the pod's cgroup v2 directory"}
	}
	return st.Ino, nil
}

// LocalAddrs returns the IPv4 addresses of the network namespace at path: the destinations
// iptables would route via lo ("-o lo"), besides 127.0.0.0/8. A namespace with an IPv6
// address (policy.CheckPodAddrs) is an InputError: its IPv6 connections would escape.
func LocalAddrs(netnsPath string) ([]netip.Addr, error) {
	if netnsPath == "" {
		return nil, &InputError{"netns", netnsPath, "required: a path to the pod's network namespace, like /proc/<pid>/ns/net or /run/netns/<name>"}
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(netnsPath, &fs); err != nil {
		return nil, &InputError{"netns", netnsPath, unwrapPathError(err).Error() + "; pass the pod's network namespace, like /proc/<pid>/ns/net or /run/netns/<name>"}
	}
	if fs.Type != unix.NSFS_MAGIC {
		return nil, &InputError{"netns", netnsPath, "not a network namespace; pass /proc/<pid>/ns/net or a bind mount of it"}
	}
	var addrs, all []netip.Addr
	err := nsexec.Do(netnsPath, func() error {
		list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range list {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			all = append(all, ip)
			if ip.Is4() && !ip.IsLoopback() {
				addrs = append(addrs, ip)
			}
		}
		return nil
	})
	if err != nil {
		return nil, &InputError{"netns", netnsPath, err.Error()}
	}
	if err := policy.CheckPodAddrs(all); err != nil {
		return nil, &InputError{"netns", netnsPath, err.Error() + "; capture only pods with IPv4 addresses"}
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	return slices.Compact(addrs), nil
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// lockState makes sure bpffs is mounted and serialises loaders on the divert directory.
func lockState(opts Options) (unlock func(), err error) {
	root := opts.root()
	if err := ensureBPFFS(root, root == DefaultBPFFS); err != nil {
		return nil, err
	}
	dir := filepath.Join(root, "divert")
	for _, d := range []string{dir, stagingDir(opts)} {
		if err := mkdirPrivate(d); err != nil {
			return nil, err
		}
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// mkdirPrivate makes d root's alone (0700): pins are opened by path, and a directory only
// root can search keeps every other uid (root in a pod's user namespace too) from the pins.
// One that exists, made by hand or by an older version, is tightened.
func mkdirPrivate(d string) error {
	if err := os.MkdirAll(d, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", d, err)
	}
	if err := os.Chmod(d, 0o700); err != nil {
		return fmt.Errorf("make %s private: %w", d, err)
	}
	return nil
}

// readableRoot says whether state can be read under opts' bpffs: pins exist only in a bpffs
// mount. Anywhere else, reading would report "nothing attached" and hide a wrong --bpffs,
// so that is an InputError; only the default place with nothing mounted is simply empty
// (attach mounts bpffs there before pinning).
func readableRoot(opts Options) (bool, error) {
	root := opts.root()
	var fs unix.Statfs_t
	if err := unix.Statfs(root, &fs); err == nil && fs.Type == unix.BPF_FS_MAGIC {
		return true, nil
	}
	if root == DefaultBPFFS {
		return false, nil
	}
	return false, &InputError{"bpffs", root, notBPFFS(root)}
}

func notBPFFS(root string) string {
	return "not a bpffs mount; pass the one divert pins under, or mount one with: mount -t bpf bpf " + root
}

func ensureBPFFS(root string, mountIfMissing bool) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(root, &fs); err == nil && fs.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if !mountIfMissing {
		return &InputError{"bpffs", root, notBPFFS(root)}
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", root, err)
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w (mount it yourself with: mount -t bpf bpf %s)", root, err, root)
	}
	return nil
}
