// divert trace's node-wide maps (bpf/trace.h): the ring buffer of decisions, the control
// (which verdicts the tracer wants, how many decisions found the buffer full) and the
// owner sockmap whose one socket means "a tracer runs". They are pinned once per node
// under <bpffs>/divert_trace/, created by the first attach (or tracer), and every pod's
// programs are loaded with them, so a node has one ring buffer whatever its pods.

package loader

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/maps"
)

// nodeMaps are the maps shared by every pod: not pinned in a pod's directory.
var nodeMaps = map[string]bool{"trace_control_map": true, "trace_events": true, "trace_owner": true}

// ErrTraceBusy is returned by StartTrace while another tracer runs on the node.
var ErrTraceBusy = errors.New("another divert trace is running on this node")

// traceDir holds the node-wide maps, next to (not in) the pod directories.
func traceDir(opts Options) string { return filepath.Join(opts.root(), "divert_trace") }

// openNodeMaps sets m's node-wide maps to the pinned ones, checked against this build's
// definitions if check, creating and pinning any that is missing. The caller holds the
// state lock, so two loaders cannot both create one.
func openNodeMaps(m *maps.Maps, opts Options, check bool) (err error) {
	if err := mkdirPrivate(traceDir(opts)); err != nil {
		return err
	}
	for _, f := range mapFields(m) {
		if !nodeMaps[f.name] {
			continue
		}
		mp, err := openOrCreate(f.name, filepath.Join(traceDir(opts), f.name), check)
		if err != nil {
			return err
		}
		*f.ptr = mp
	}
	return nil
}

// openOrCreate opens the pinned map name at path (checked against this build's definition
// if check), or creates and pins it.
func openOrCreate(name, path string, check bool) (*ebpf.Map, error) {
	mp, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil && !check {
		return mp, nil
	}
	spec, serr := parsedSpec()
	if serr != nil {
		if mp != nil {
			mp.Close()
		}
		return nil, fmt.Errorf("load embedded BPF spec: %w", serr)
	}
	ms := spec.Maps[name]
	if err == nil {
		if err := ms.Compatible(mp); err != nil {
			mp.Close()
			// A later build's layout: its tracer and its pods use it; this one cannot.
			return nil, fmt.Errorf("pinned map %s: %w (%w)", path, ErrIncompatible, err)
		}
		return mp, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open pinned map %s: %w", path, err)
	}
	if err := raiseMemlock(); err != nil {
		return nil, err
	}
	ms = ms.Copy()
	ms.Pinning = ebpf.PinNone
	if mp, err = ebpf.NewMap(ms); err != nil {
		return nil, fmt.Errorf("create map %s: %w", ms.Name, err)
	}
	if err := mp.Pin(path); err != nil {
		mp.Close()
		return nil, fmt.Errorf("pin map %s: %w", path, err)
	}
	// Not a crashpoint step: only the node's first attach makes them, so the crash tests'
	// count of an attach's steps would change from run to run; and a kill here leaves a
	// whole pin or none (one syscall), which the next attach reuses or makes.
	return mp, nil
}

// Tracer holds tracing on: while it is open (and its process lives) the programs of
// every pod loaded with the node's maps write their decisions to Events.
type Tracer struct {
	// Events is the node's ring buffer of bpf.DivertTraceEvent: read it with
	// ringbuf.NewReader.
	Events  *ebpf.Map
	control *ebpf.Map
	owner   *ebpf.Map
	sock    net.Listener
	owns    bool // its socket is the one in owner: Close takes it out
}

// StartTrace turns tracing on for the verdicts listed (all if none) until Close. Tracing
// is on while the owner sockmap holds a socket of this process: a listener on 127.0.0.1
// that nothing accepts from. The kernel drops a socket from a sockmap when it closes,
// and it closes when this process ends in any way (SIGKILL too), so tracing cannot be
// left on. One tracer per node: another gets ErrTraceBusy.
func StartTrace(opts Options, verdicts []bpf.DivertTraceVerdict) (_ *Tracer, err error) {
	unlock, err := lockState(opts)
	if err != nil {
		return nil, err
	}
	var m maps.Maps
	err = openNodeMaps(&m, opts, true)
	unlock()
	if err != nil {
		m.Close()
		return nil, err
	}
	t := &Tracer{Events: m.TraceEvents, control: m.TraceControlMap, owner: m.TraceOwner}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	// Not Go's default MPTCP listener: a sockmap refuses MPTCP sockets.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	if t.sock, err = lc.Listen(context.Background(), "tcp4", "127.0.0.1:0"); err != nil {
		return nil, fmt.Errorf("trace: listen on 127.0.0.1: %w", err)
	}
	raw, err := t.sock.(*net.TCPListener).SyscallConn()
	if err != nil {
		return nil, err
	}
	var uerr error
	if err := raw.Control(func(fd uintptr) {
		uerr = t.owner.Update(uint32(0), uint64(fd), ebpf.UpdateNoExist)
	}); err != nil {
		return nil, err
	}
	if errors.Is(uerr, ebpf.ErrKeyExist) {
		return nil, ErrTraceBusy
	}
	if uerr != nil {
		return nil, fmt.Errorf("trace: turn on (update trace_owner): %w", uerr)
	}
	t.owns = true
	var ctl bpf.DivertTraceControl
	for _, v := range verdicts {
		ctl.Verdicts |= 1 << v
	}
	if err := t.control.Put(uint32(0), &ctl); err != nil {
		return nil, fmt.Errorf("trace: update trace_control_map: %w", err)
	}
	return t, nil
}

// Lost returns how many decisions found the ring buffer full since tracing began.
func (t *Tracer) Lost() (uint64, error) {
	var ctl bpf.DivertTraceControl
	err := t.control.Lookup(uint32(0), &ctl)
	return ctl.Lost, err
}

// Close turns tracing off: the owner slot is emptied before the socket closes, which
// would empty it too.
func (t *Tracer) Close() error {
	var errs []error
	if t.owns {
		if err := t.owner.Delete(uint32(0)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("trace: turn off: %w", err))
		}
		t.owns = false
	}
	if t.sock != nil {
		errs = append(errs, t.sock.Close())
		t.sock = nil
	}
	for _, m := range []*ebpf.Map{t.Events, t.control, t.owner} {
		if m != nil {
			m.Close() // again is harmless: runTrace closes early to say how it went
		}
	}
	return errors.Join(errs...)
}

// TraceOn reports whether a tracer holds tracing on, and the node's ring buffer's map id
// (0 when no attach or tracer made it yet).
func TraceOn(opts Options) (on bool, events ebpf.MapID, err error) {
	owner, err := ebpf.LoadPinnedMap(filepath.Join(traceDir(opts), "trace_owner"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return false, 0, nil
	}
	if err != nil {
		return false, 0, err
	}
	defer owner.Close()
	var cookie uint64
	switch err := owner.Lookup(uint32(0), &cookie); {
	case errors.Is(err, ebpf.ErrKeyNotExist):
	case err != nil:
		return false, 0, fmt.Errorf("read trace_owner: %w", err)
	default:
		on = true
	}
	ev, err := ebpf.LoadPinnedMap(filepath.Join(traceDir(opts), "trace_events"), nil)
	if err != nil {
		return on, 0, err
	}
	defer ev.Close()
	info, err := ev.Info()
	if err != nil {
		return on, 0, err
	}
	id, _ := info.ID()
	return on, id, nil
}

// Traced reports whether a pod's running programs write to the ring buffer with map id
// events: false for pods attached by a build before divert trace (until an attach
// updates them) or with another node's maps.
func Traced(st *PodStatus, events ebpf.MapID) bool {
	for _, p := range st.Programs {
		prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(p.ProgramID))
		if err != nil {
			continue
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil {
			continue
		}
		if ids, ok := info.MapIDs(); ok && slices.Contains(ids, events) {
			return true
		}
	}
	return false
}
