package cluster

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// debianPackages maps a file the cluster needs to the Debian package that ships it.
var debianPackages = []struct{ file, pkg string }{
	{"/usr/bin/etcd", "etcd-server"},
	{"/usr/bin/containerd", "containerd"},
	{"/usr/bin/ctr", "containerd"},
	{"/usr/sbin/runc", "runc"},
	{"/usr/lib/cni/bridge", "containernetworking-plugins"},
	{"/usr/lib/cni/host-local", "containernetworking-plugins"},
	{"/usr/lib/cni/loopback", "containernetworking-plugins"},
	{"/usr/sbin/conntrack", "conntrack"},
	{"/usr/bin/socat", "socat"},
	{"/usr/sbin/xtables-nft-multi", "iptables"},
	{"/usr/sbin/xtables-legacy-multi", "iptables"},
	{"/usr/sbin/nft", "nftables"}, // kube-proxy's nftables mode runs it
	{"/sbin/ip", "iproute2"},
}

// ensurePackages installs what is missing with apt-get, the only way these machines reach
// software besides the Go module proxy. `apt-get update` runs only when something is
// missing, so a machine that has everything is not touched.
func ensurePackages(logf func(string, ...any)) error {
	var need []string
	for _, p := range debianPackages {
		if _, err := os.Stat(p.file); err != nil && !slices.Contains(need, p.pkg) {
			need = append(need, p.pkg)
		}
	}
	if len(need) == 0 {
		return nil
	}
	logf("installing Debian packages: %s", strings.Join(need, " "))
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	for _, args := range [][]string{
		{"update", "-qq"},
		append([]string{"install", "-y", "-qq", "--no-install-recommends"}, need...),
	} {
		cmd := exec.Command("apt-get", args...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get %s: %v\n%s", args[0], err, tail(out, 20))
		}
	}
	return nil
}

// sysctlRoots are the host settings a cluster may change: the CNI bridge plugin turns on
// ip_forward and net.ipv6.conf.all.forwarding (which sets every interface's; the host's
// interfaces are recorded too, see sysctlDirs), and the kubelet sets vm.overcommit_memory, vm.panic_on_oom, kernel.panic,
// kernel.panic_on_oops and kernel.keys.* at start. Only files that are both readable and
// writable are recorded, and only those that differ afterwards are written back.
var sysctlRoots = []struct {
	dir       string
	recursive bool
}{
	{"/proc/sys/net/ipv4", false},
	{"/proc/sys/net/ipv4/conf/all", false},
	{"/proc/sys/net/ipv4/conf/default", false},
	{"/proc/sys/net/ipv6/conf/all", false},
	{"/proc/sys/net/ipv6/conf/default", false},
	{"/proc/sys/net/bridge", false},
	{"/proc/sys/net/netfilter", false},
	{"/proc/sys/vm", false},
	{"/proc/sys/kernel", false},
	{"/proc/sys/kernel/keys", false},
}

// sysctlSkip are files whose value changes by itself or whose read has side effects.
var sysctlSkip = map[string]bool{
	"/proc/sys/vm/stat_refresh": true, "/proc/sys/vm/drop_caches": true, "/proc/sys/vm/compact_memory": true,
	"/proc/sys/kernel/ns_last_pid": true, "/proc/sys/kernel/sysrq": false,
}

func snapshotSysctls() map[string]string {
	vals := map[string]string{}
	for _, r := range sysctlRoots {
		ents, err := os.ReadDir(r.dir)
		if err != nil {
			continue // e.g. net/bridge without br_netfilter
		}
		for _, e := range ents {
			p := filepath.Join(r.dir, e.Name())
			if e.IsDir() || sysctlSkip[p] {
				continue
			}
			info, err := e.Info()
			if err != nil || info.Mode().Perm()&0o600 != 0o600 {
				continue
			}
			b, err := os.ReadFile(p)
			if err != nil {
				continue
			}
			vals[p] = strings.TrimSpace(string(b))
		}
	}
	// Writing conf/all/forwarding (ip_forward for IPv4) rewrites every interface's, and
	// putting all back need not put an interface's own value back: record the host's
	// interfaces' forwarding too (only that: other engineers' veths come and go).
	ifs, _ := filepath.Glob("/proc/sys/net/ipv[46]/conf/*/forwarding")
	for _, p := range ifs {
		if d := filepath.Base(filepath.Dir(p)); d == "all" || d == "default" {
			continue
		}
		if b, err := os.ReadFile(p); err == nil {
			vals[p] = strings.TrimSpace(string(b))
		}
	}
	return vals
}

// restoreSysctls writes back every recorded value that changed and says which.
func restoreSysctls(before map[string]string, logf func(string, ...any)) error {
	now := snapshotSysctls()
	keys := make([]string, 0, len(before))
	for k := range before {
		keys = append(keys, k)
	}
	// ip_forward first, then conf/all, then conf/default: each rewrites what follows it
	// (conf/*/forwarding), which is then restored after.
	rank := func(k string) int {
		switch {
		case strings.HasSuffix(k, "/ip_forward"):
			return 0
		case strings.Contains(k, "/conf/all/"):
			return 1
		case strings.Contains(k, "/conf/default/"):
			return 2
		}
		return 3
	}
	sort.Slice(keys, func(i, j int) bool {
		if ri, rj := rank(keys[i]), rank(keys[j]); ri != rj {
			return ri < rj
		}
		return keys[i] < keys[j]
	})
	var errs []error
	for _, k := range keys {
		if v, ok := now[k]; !ok || v == before[k] {
			continue
		}
		// Re-read: an earlier restore (ip_forward) may already have put it back.
		cur, err := os.ReadFile(k)
		if err == nil && strings.TrimSpace(string(cur)) == before[k] {
			continue
		}
		logf("restoring %s = %s (was %s)", sysctlName(k), before[k], now[k])
		if err := os.WriteFile(k, []byte(before[k]), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", sysctlName(k), err))
		}
	}
	return errors.Join(errs...)
}

func sysctlName(p string) string {
	return strings.ReplaceAll(strings.TrimPrefix(p, "/proc/sys/"), "/", ".")
}

// iptables: the host's tables are recorded before the cluster starts; afterwards, rules and
// chains that appeared and belong to the cluster (KUBE-*/CNI-* chains, or rules naming the
// pod CIDRs or the bridge) are removed. Changes someone else made meanwhile are reported and
// left alone. IPv6 too: kube-proxy sets up both families where the kernel has them.
var iptablesVariants = []string{"nft", "legacy", "nft6", "legacy6"}

// iptablesBin is the variant's command: iptables-nft-save, ip6tables-legacy-restore, ...
func iptablesBin(variant, verb string) string {
	if v, ok := strings.CutSuffix(variant, "6"); ok {
		return "/usr/sbin/ip6tables-" + v + "-" + verb
	}
	return "/usr/sbin/iptables-" + variant + "-" + verb
}

func iptablesSave(variant string) (string, error) {
	bin := iptablesBin(variant, "save")
	if _, err := os.Stat(bin); err != nil {
		return "", nil
	}
	out, err := exec.Command(bin).Output()
	return string(out), err
}

// parseSave returns table -> chains and table -> rules ("-A CHAIN ..." lines, as saved).
func parseSave(dump string) (chains, rules map[string][]string) {
	chains, rules = map[string][]string{}, map[string][]string{}
	table := ""
	for _, line := range strings.Split(dump, "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case strings.HasPrefix(line, ":"):
			chains[table] = append(chains[table], strings.Fields(line[1:])[0])
		case strings.HasPrefix(line, "-A "):
			rules[table] = append(rules[table], line)
		}
	}
	return chains, rules
}

var builtinChains = map[string]bool{"PREROUTING": true, "INPUT": true, "FORWARD": true, "OUTPUT": true, "POSTROUTING": true}

// ours: a KUBE-/CNI- chain, or a rule naming one of names (the pod CIDRs, the bridge).
func ours(s string, names []string) bool {
	return strings.Contains(s, "KUBE-") || strings.Contains(s, "CNI-") ||
		slices.ContainsFunc(names, func(n string) bool { return strings.Contains(s, n) })
}

func restoreIptables(before map[string]string, names []string, logf func(string, ...any)) error {
	var errs []error
	for _, v := range iptablesVariants {
		now, err := iptablesSave(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("iptables-%s-save: %w", v, err))
			continue
		}
		bc, br := parseSave(before[v])
		nc, nr := parseSave(now)
		var script strings.Builder
		for table, rules := range nr {
			var dels []string
			for _, r := range rules {
				if i := slices.Index(br[table], r); i >= 0 {
					br[table] = slices.Delete(slices.Clone(br[table]), i, i+1)
					continue
				}
				if ours(r, names) {
					dels = append(dels, "-D "+strings.TrimPrefix(r, "-A "))
				} else {
					logf("iptables-%s: rule %q appeared during the run and is not the cluster's; left alone", v, r)
				}
			}
			var flush, drop []string
			for _, c := range nc[table] {
				if slices.Contains(bc[table], c) || builtinChains[c] {
					continue // built-in chains come with a table iptables-nft made: restoreNFTables
				}
				if ours(c, names) {
					flush, drop = append(flush, "-F "+c), append(drop, "-X "+c)
				} else {
					logf("iptables-%s: chain %s appeared during the run and is not the cluster's; left alone", v, c)
				}
			}
			if len(dels)+len(drop) == 0 {
				continue
			}
			logf("iptables-%s: removing %d rules and %d chains the cluster added to table %s %v", v, len(dels), len(drop), table, drop)
			fmt.Fprintf(&script, "*%s\n%s\nCOMMIT\n", table, strings.Join(slices.Concat(dels, flush, drop), "\n"))
		}
		if script.Len() == 0 {
			continue
		}
		cmd := exec.Command(iptablesBin(v, "restore"), "--noflush")
		cmd.Stdin = strings.NewReader(script.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("iptables-%s-restore: %v: %s\n%s", v, err, out, script.String()))
		}
	}
	return errors.Join(errs...)
}

// mountsUnder lists mount points at or below dir, deepest (latest) first, from mountinfo.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var pts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			pts = append(pts, mp)
		}
	}
	slices.Reverse(pts) // mountinfo lists in mount order; undo in reverse
	return pts, sc.Err()
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountAll unmounts everything at or below dir, deepest first. A mount still busy after a
// few tries is detached lazily (MNT_DETACH) so the state directory can always be removed.
func unmountAll(dir string) error {
	for attempt := 0; ; attempt++ {
		pts, err := mountsUnder(dir)
		if err != nil || len(pts) == 0 {
			return err
		}
		var busy []string
		for _, p := range pts {
			flags := 0
			if attempt >= 3 {
				flags = unix.MNT_DETACH
			}
			if err := unix.Unmount(p, flags); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				busy = append(busy, fmt.Sprintf("%s: %v", p, err))
			}
		}
		if attempt >= 4 {
			if len(busy) > 0 {
				return fmt.Errorf("unmount: %s", strings.Join(busy, "; "))
			}
			return nil
		}
		if len(busy) > 0 {
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// cgroupMounts returns every cgroup (v1) and cgroup2 mount point of the host.
func cgroupMounts() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var pts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		_, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		if fstype := strings.Fields(post)[0]; fstype == "cgroup" || fstype == "cgroup2" {
			pts = append(pts, unescapeMount(strings.Fields(line)[4]))
		}
	}
	return pts
}

// kubepodsDirs are the cgroups the kubelet (and runc, mirroring into cgroup v2) create for
// pods: <mount>/kubepods in every hierarchy.
func kubepodsDirs() []string {
	var dirs []string
	for _, m := range cgroupMounts() {
		d := filepath.Join(m, "kubepods")
		if _, err := os.Stat(d); err == nil {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// killKubepods SIGKILLs every process in the pod cgroups (of any hierarchy) and waits up
// to 10 s for them to be gone.
func killKubepods(logf func(string, ...any)) error {
	for i := 0; i < 100; i++ {
		var pids []int
		for _, root := range kubepodsDirs() {
			_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				if err != nil || !d.IsDir() {
					return nil
				}
				b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil && pid > 0 && !slices.Contains(pids, pid) {
						pids = append(pids, pid)
					}
				}
				return nil
			})
		}
		if len(pids) == 0 {
			return nil
		}
		if i == 0 {
			logf("killing %d processes left in pod cgroups", len(pids))
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("processes remain in %v after SIGKILL", kubepodsDirs())
}

// removeKubepods kills whatever is still running in the pod cgroups (only after the
// containers were stopped through containerd, or after a crash) and removes the
// directories, deepest first.
func removeKubepods(logf func(string, ...any)) error {
	var errs []error
	for attempt := 0; attempt < 50; attempt++ {
		errs = nil
		for _, root := range kubepodsDirs() {
			var dirs []string
			_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if b, err := os.ReadFile(filepath.Join(dirs[i], "cgroup.procs")); err == nil {
					for _, f := range strings.Fields(string(b)) {
						if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
							if attempt == 0 {
								logf("killing leftover pid %d in %s", pid, dirs[i])
							}
							_ = syscall.Kill(pid, syscall.SIGKILL)
						}
					}
				}
				if err := unix.Rmdir(dirs[i]); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("rmdir %s: %w", dirs[i], err))
				}
			}
		}
		if len(errs) == 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.Join(errs...)
}

// deleteLink removes a network interface if it exists (the CNI bridge).
func deleteLink(name string) error {
	if _, err := os.Stat("/sys/class/net/" + name); err != nil {
		return nil
	}
	if out, err := exec.Command("ip", "link", "del", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip link del %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	return nil
}

// listDir returns the names in dir (nil if it does not exist).
func listDir(dir string) []string {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	names := make([]string, len(ents))
	for i, e := range ents {
		names[i] = e.Name()
	}
	return names
}

func tail(b []byte, lines int) string {
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}
