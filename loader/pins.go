// Pin lifecycle: where a pod's pins live, the bpffs mount and the lock that serialises
// loaders on it, pinning and reopening maps and links, staging (an attach pins there and
// renames into place; a detach renames out before taking apart) and the clean-up of what a
// killed loader left there.

package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/maps"
)

// stagingDir holds pins of an attach in progress, next to (not in) the pod directories.
func stagingDir(opts Options) string { return filepath.Join(opts.root(), "divert_staging") }

// PinDir is the directory that holds a pod's pins.
func PinDir(opts Options, id string) string { return filepath.Join(opts.root(), "divert", id) }

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
// mount. Anywhere else, reading would report "nothing attached" and hide a wrong BPFFS,
// so that is an InputError; only the default place with nothing mounted is simply empty
// (attach mounts bpffs there before pinning).
func readableRoot(opts Options) (bool, error) {
	root := opts.root()
	if IsBPFFS(root) {
		return true, nil
	}
	if root == DefaultBPFFS {
		return false, nil
	}
	return false, &InputError{Field: "bpffs", Value: root, Msg: notBPFFS(root)}
}

// IsBPFFS reports whether dir is a bpffs mount, where pins can live.
func IsBPFFS(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

func notBPFFS(root string) string {
	return "not a bpffs mount; pass the one divert pins under, or mount one with: mount -t bpf bpf " + root
}

func ensureBPFFS(root string, mountIfMissing bool) error {
	if IsBPFFS(root) {
		return nil
	}
	if !mountIfMissing {
		return &InputError{Field: "bpffs", Value: root, Msg: notBPFFS(root)}
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", root, err)
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w (mount it yourself with: mount -t bpf bpf %s)", root, err, root)
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
		if e.IsDir() && validID(e.Name()) {
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
func CloseMaps(m *maps.Maps) { m.Close() }

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

// loadPinnedMaps opens the maps of the pod whose pins are in dir: all its own in the
// per-pod layout; in the node layout its own (podMapNames) and, from the node's maps, the
// socket storage, transparent_syns and node_listeners.
func loadPinnedMaps(dir string) (*maps.Maps, error) {
	slot, err := readSlot(dir)
	if err != nil {
		return nil, err
	}
	m := &maps.Maps{}
	for _, f := range mapFields(m) {
		from := dir
		if slot != 0 {
			switch {
			case slices.Contains(podMapNames, f.name):
			case f.name == "orig_dst_storage" || f.name == "transparent_syns" || f.name == "node_listeners":
				from = nodeMapsDirOf(dir)
			default:
				continue
			}
		} else if !slices.Contains(perPodLayoutMaps, f.name) {
			continue
		}
		mp, err := ebpf.LoadPinnedMap(filepath.Join(from, f.name), nil)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", f.name, err)
		}
		*f.ptr = mp
	}
	return m, nil
}

// nodeMapsDirOf is the node maps' directory under the bpffs of a pod's (or a staged) pin
// directory: <bpffs>/divert/<id> or <bpffs>/divert_staging/<name>.
func nodeMapsDirOf(dir string) string {
	return filepath.Join(filepath.Dir(filepath.Dir(dir)), "divert_node", "maps")
}

func loadPinnedLink(path string) (link.Link, error) {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return nil, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	return l, nil
}

// retireDir moves a pod's pin directory into staging, where it is taken apart: from then
// on the pod is not attached, whatever happens to this process.
func retireDir(opts Options, id string) (string, error) {
	to := filepath.Join(stagingDir(opts), id+"-detach-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	if err := os.Rename(PinDir(opts, id), to); err != nil {
		return "", fmt.Errorf("move pins of pod %s aside: %w", id, err)
	}
	return to, nil
}

// teardown takes an attached pod's pin directory apart, for a caller that holds the state
// lock: capture stops in both directions at once, then the pins move aside (retireDir), and
// then the links are detached and the pins removed (detachDir). A kill after either of the
// first two leaves the pod uncaptured, and the next run finishes (crash.go).
func teardown(opts Options, id string) error {
	if err := disarmPinned(PinDir(opts, id)); err != nil {
		return fmt.Errorf("pod %s: %w", id, err)
	}
	step("disarm")
	// While the pins still say the pod's mode and netns (tproxy.go); a failure here leaves
	// a route that only the proxy's marked packets use, and the detach goes on.
	rpErr := removeReturnPath(PinDir(opts, id))
	retired, err := retireDir(opts, id)
	if err != nil {
		return errors.Join(err, rpErr)
	}
	step("retire")
	unindexSlot(opts, id)
	if err := detachDir(retired); err != nil {
		return errors.Join(fmt.Errorf("pod %s: %w", id, err), rpErr)
	}
	if rpErr != nil {
		return fmt.Errorf("pod %s: remove TPROXY return path: %w", id, rpErr)
	}
	return nil
}

// cleanStaging detaches and removes what dead loaders left in staging. The caller holds
// the state lock.
func cleanStaging(opts Options) error {
	entries, err := os.ReadDir(stagingDir(opts))
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if err := detachDir(filepath.Join(stagingDir(opts), e.Name())); err != nil {
			errs = append(errs, fmt.Errorf("remove what an interrupted attach or detach left in %s: %w", e.Name(), err))
		}
	}
	return errors.Join(errs...)
}

// detachDir is Detach's work on a pin directory, for a caller that holds the state lock:
// links are detached explicitly (a no-op for the ones the kernel already detached),
// connect4 first, then the pins go.
func detachDir(dir string) error {
	var errs []error
	for _, p := range slices.Backward(programs) {
		l, err := loadPinnedLink(filepath.Join(dir, p.pin))
		if errors.Is(err, os.ErrNotExist) {
			continue // not attached in this pod, or a previous detach got this far
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach %s: %w", p.name, err))
		}
		l.Close()
		step("detach " + p.name)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	// The slot is free once the directory that records it is gone; its maps stay in the
	// node's outer maps for the next pod (node.go).
	return os.RemoveAll(dir)
}
