package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/image"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// initSlice is where kubelet's cgroupfs driver puts a BestEffort pod's cgroup.
const initSlice = "kubepods/besteffort"

// initArgs is the istio-init command line of Istio's sidecar injector (after
// "istio-iptables"), as test/initmode runs it.
var initArgs = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// initModeArgs is what picks the backend: eBPF, or istio's exact rules through
// iptables-restore with the mode's backend.
func initModeArgs(m Mode) []string {
	switch m {
	case NFT:
		return []string{"--mode", "iptables", "--iptables-backend", "nft"}
	case Legacy:
		return []string{"--mode", "iptables", "--iptables-backend", "legacy"}
	}
	return []string{"--mode", "ebpf"}
}

// b5Init runs the image's divert binary as each pod's init container would: in the pod's
// netns, in a fresh container cgroup below the pod's cgroup laid out as kubelet's cgroupfs
// driver does, with the injector's flags; one pass per mode over pods 1..N, the captures
// staying until the pass ends (pod k starts with k−1 captured), then removed as B5 removes
// them. eBPF gets a bpffs of its own, so its first run finds no programs pinned and loads
// the node's; its first pass takes a new slot per pod, the second (EBPFReused) the slots
// the first pass's pods left.
func (r *rig) b5Init(s *scope, pods []*testpod.Pod) {
	divert := image.Divert(s)
	opts := divertest.BPFFS(s)
	ctr, err := newContainerSpawner() // after the bpffs mount, which its copy of the table keeps
	if err != nil {
		s.Fatal(err)
	}
	ctx := context.Background()
	uids := make([]string, len(pods))
	dirs := make([]string, len(pods))
	for i, p := range pods {
		uids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1)
		dirs[i] = filepath.Join(p.CgroupPath, initSlice, "pod"+uids[i])
		if err := os.MkdirAll(dirs[i], 0o755); err != nil {
			s.Fatal(err)
		}
		top := filepath.Join(p.CgroupPath, "kubepods")
		s.Cleanup(func() {
			for d := dirs[i]; d != p.CgroupPath; d = filepath.Dir(d) {
				if err := unix.Rmdir(d); err != nil && err != unix.ENOENT {
					s.Errorf("rmdir %s: %v", d, err)
				}
				if d == top {
					break
				}
			}
		})
	}
	// Whatever an error leaves attached is detached before the cgroups go.
	s.Cleanup(func() {
		for _, id := range uids {
			if err := loader.Detach(id, opts); err != nil && !errors.Is(err, loader.ErrNotAttached) {
				s.Errorf("detach %s: %v", id, err)
			}
		}
	})
	for _, m := range initModes {
		args := append(append([]string{"istio-iptables", "--bpffs", opts.BPFFS}, initModeArgs(m)...), initArgs...)
		for i, p := range pods {
			wall, cpu, out := initRun(s, ctr, divert, p, dirs[i], args)
			want := "attached pod " + uids[i] + " with eBPF"
			if !isEBPF(m) {
				want = "iptables rules applied (" + string(m) + ","
			}
			if !strings.Contains(out, want) {
				s.Fatalf("B5 %s init run of pod %d: output lacks %q:\n%s", m, i+1, want, out)
			}
			// The group's last pod count as param and the pod as round: ratios pair pods.
			k := groupOf(r.p.B5Pods, i+1)
			r.res.Add(B5Init, InitWall, k, m, i, ms(wall))
			r.res.Add(B5Init, InitCPU, k, m, i, ms(cpu))
		}
		for i := len(pods) - 1; i >= 0; i-- {
			var err error
			if isEBPF(m) {
				err = loader.Detach(uids[i], opts)
			} else {
				err = iptablesOpts(m).Cleanup(ctx, pods[i].NetNSPath)
			}
			if err != nil {
				s.Fatalf("B5 %s: remove the capture of pod %d: %v", m, i+1, err)
			}
		}
	}
	for _, k := range r.p.B5Pods {
		var line []string
		for _, m := range initModes {
			line = append(line, fmt.Sprintf("%s %s ms (CPU %s)", m, Summarize(r.res.Values(B5Init, InitWall, k, m)), Summarize(r.res.Values(B5Init, InitCPU, k, m))))
		}
		r.logf("  B5 init run, group ending at pod %d: %s", k, strings.Join(line, ", "))
	}
}

func isEBPF(m Mode) bool { return m == EBPF || m == EBPFReused }

// groupOf is the B5 group (its last pod count) pod k (1-based) belongs to.
func groupOf(groups []int, k int) int {
	for _, g := range groups {
		if k <= g {
			return g
		}
	}
	return groups[len(groups)-1]
}

// initRun runs divert once as an init container of pod p whose cgroup is podDir: born
// (clone3 into the cgroup) in a fresh container cgroup below podDir, in the pod's netns and
// in the container mount namespace of ctr, as root with only PATH set, as in the image; the
// cgroup is removed once it exited. It
// returns the wall time from just before the fork to the reaping, the CPU time wait4
// reports for the process and its reaped children (iptables-restore, iptables-save), and
// its output; anything but a clean exit with nothing on stderr ends the benchmark.
func initRun(s *scope, ctr *containerSpawner, divert string, p *testpod.Pod, podDir string, args []string) (wall, cpu time.Duration, stdout string) {
	s.Helper()
	dir := filepath.Join(podDir, fmt.Sprintf("%064x", time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		s.Fatal(err)
	}
	defer func() {
		for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if err := unix.Rmdir(dir); err != unix.EBUSY || time.Now().After(deadline) {
				return
			}
		}
	}()
	cg, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		s.Fatal(err)
	}
	defer unix.Close(cg)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, divert, args...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Dir = "/"
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg, Pdeathsig: syscall.SIGKILL}
	ns, err := unix.Open(p.NetNSPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		s.Fatal(err)
	}
	defer unix.Close(ns)
	start := time.Now()
	if err := ctr.start(ns, cmd); err != nil {
		s.Fatalf("start %s: %v", divert, err)
	}
	err = cmd.Wait()
	wall = time.Since(start)
	if err != nil || errOut.Len() > 0 {
		s.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", divert, strings.Join(args, " "), err, &out, &errOut)
	}
	return wall, cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(), out.String()
}
