package loader

import (
	"bufio"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/cgroups"
)

// ProcsOutside lists the processes that have a thread in the pod's network namespace but
// are neither in the pod's cgroup (cgroupID) nor below it: sockets they make there are not
// captured, though the pod's app may use them (docs/security.md, "Sockets made outside the
// pod's cgroup"). In Kubernetes there should be none. The netns is netnsIno (an nsfs
// inode), or if 0 every netns the cgroup's processes are in. It reads procRoot (the host's
// /proc: its pids must be those of cgroup.procs, so run it in the host's pid namespace) and
// finds the cgroup under cgroupRoot, a cgroup2 mount that shows it.
func ProcsOutside(procRoot, cgroupRoot string, netnsIno, cgroupID uint64) ([]int, error) {
	if !cgroups.IsCgroup2Dir(cgroupRoot) {
		return nil, errors.New("not a cgroup2 mount") // a v1 hierarchy's inodes could match
	}
	dir, err := cgroups.FindByID(cgroupRoot, cgroupID)
	if err != nil {
		return nil, err
	}
	netns := map[uint64]bool{netnsIno: netnsIno != 0}
	if netnsIno == 0 {
		for pid := range members(dir) {
			for _, ino := range taskNetNS(procRoot, strconv.Itoa(pid)) {
				netns[ino] = true
			}
		}
	}
	// Candidates before members: a process started in the pod after the scan is no
	// candidate, and one that left the pod's cgroup before it is no member.
	var candidates []int
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		for _, ino := range taskNetNS(procRoot, e.Name()) {
			if netns[ino] {
				candidates = append(candidates, pid)
				break
			}
		}
	}
	in := members(dir)
	var out []int
	for _, pid := range candidates {
		// One that exited since the scan also left cgroup.procs: not an outsider.
		if _, err := os.Stat(filepath.Join(procRoot, strconv.Itoa(pid))); !in[pid] && err == nil {
			out = append(out, pid)
		}
	}
	return out, nil
}

// members are the processes in the cgroup dir or below it.
func members(dir string) map[int]bool {
	pids := map[int]bool{}
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // a cgroup removed while walking, or a control file
		}
		f, err := os.Open(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		defer f.Close()
		for sc := bufio.NewScanner(f); sc.Scan(); {
			if pid, err := strconv.Atoi(sc.Text()); err == nil {
				pids[pid] = true
			}
		}
		return nil
	})
	return pids
}

// taskNetNS is the netns inode of each thread of the process (a thread can setns alone).
func taskNetNS(procRoot, pid string) []uint64 {
	tasks, err := os.ReadDir(filepath.Join(procRoot, pid, "task"))
	if err != nil {
		return nil // exited
	}
	var out []uint64
	for _, t := range tasks {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(procRoot, pid, "task", t.Name(), "ns", "net"), &st) == nil {
			out = append(out, st.Ino)
		}
	}
	return out
}

// CheckOutsiders fills st.OutsideCgroup (see ProcsOutside) from where the pod's programs
// are attached, or st.OutsideCgroupUnchecked with why it could not.
func (st *PodStatus) CheckOutsiders(procRoot, cgroupRoot string) {
	var netnsIno, cgroupID uint64
	for _, p := range st.Programs {
		netnsIno, cgroupID = max(netnsIno, p.NetNSIno), max(cgroupID, p.CgroupID)
	}
	if cgroupID == 0 {
		st.OutsideCgroupUnchecked = "no cgroup program attached (or its cgroup is gone)"
		return
	}
	pids, err := ProcsOutside(procRoot, cgroupRoot, netnsIno, cgroupID)
	if err != nil {
		st.OutsideCgroupUnchecked = "cgroup " + strconv.FormatUint(cgroupID, 10) + " under " + cgroupRoot + ": " + err.Error()
		return
	}
	st.OutsideCgroup = pids
}
