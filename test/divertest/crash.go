package divertest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshdivert/divert/internal/crashpoint"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testpod"
)

// Kinds are divert's attach points: four on the pod's cgroup, sk_lookup on its netns.
var Kinds = func() []ebpf.AttachType {
	var out []ebpf.AttachType
	for _, l := range loader.Plan(loader.Options{}) {
		out = append(out, l.AttachType)
	}
	return out
}()

// directionWhole reports whether every program the direction needs is attached once.
func directionWhole(kinds map[ebpf.AttachType]int, inbound bool) bool {
	for _, l := range loader.Plan(loader.Options{}) {
		if (inbound && l.Inbound || !inbound && l.Outbound) && kinds[l.AttachType] != 1 {
			return false
		}
	}
	return true
}

// ProgramsByKind counts the programs the kernel runs for the pod at each of Kinds, by
// querying its cgroup and netns (whoever attached them, pinned or not).
func ProgramsByKind(pod *testpod.Pod) (map[ebpf.AttachType]int, error) {
	n := map[ebpf.AttachType]int{}
	for _, at := range Kinds {
		path := pod.CgroupPath
		if at == ebpf.AttachSkLookup {
			path = pod.NetNSPath
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("query %s programs on %s: %w", at, path, err)
		}
		n[at] = len(res.Programs)
	}
	return n, nil
}

// CrashProbe tells whether a pod is captured, from the kernel's attachments and from real
// traffic, and refuses the states a killed loader must never leave. Landed serves any test
// that needs a pod's traffic to land where it should.
type CrashProbe struct {
	Pod     *testpod.Pod
	Out, In testpod.Target // out: app → a server outside; in: outside → the app's port
}

// NewCrashProbe starts a server outside the pod (port 80), the app's server (8080) and
// the proxy (15001 and 15006, reporting) in the pod.
func NewCrashProbe(tb testing.TB, pod *testpod.Pod) *CrashProbe {
	tb.Helper()
	any := netip.IPv4Unspecified()
	pod.Net.Server(tb, "remote", netip.AddrPortFrom(any, 80))
	pod.Server(tb, "app", netip.AddrPortFrom(any, 8080), AppUID, AppUID)
	pod.StartProxy(tb, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: ProxyUID, GID: ProxyUID,
		Listen: []netip.AddrPort{netip.AddrPortFrom(any, 15001), netip.AddrPortFrom(any, 15006)}})
	return &CrashProbe{Pod: pod,
		Out: testpod.Target{Dst: netip.AddrPortFrom(pod.Net.Addrs[0], 80)},
		In:  testpod.Target{Dst: netip.AddrPortFrom(pod.Addr, 8080)}}
}

// Landed requires Out to be answered by wantOut ("proxy" or "remote") and In by wantIn
// ("proxy" or "app"); step names the moment in the test's errors.
func (c *CrashProbe) Landed(tb testing.TB, step, wantOut, wantIn string) {
	tb.Helper()
	if r := c.Pod.Dial(tb, AppUID, AppUID, c.Out)[0]; len(r.Hops) != 1 || r.Hops[0].Who != wantOut {
		tb.Errorf("%s: outbound landed %+v, want %s", step, r, wantOut)
	}
	if r := c.Pod.Net.Dial(tb, c.In)[0]; len(r.Hops) != 1 || r.Hops[0].Who != wantIn {
		tb.Errorf("%s: inbound landed %+v, want %s", step, r, wantIn)
	}
}

// Captured reports whether the pod is captured whole (every program attached once,
// outbound and inbound reach the proxy with their original destination), false if not at
// all (outbound reaches the server, inbound the app), and an error for anything else:
// one direction without the other, a program attached twice, a connection that failed.
func (c *CrashProbe) Captured(tb testing.TB) (bool, error) {
	tb.Helper()
	out, in, kinds, err := c.Directions(tb)
	if err != nil {
		return false, err
	}
	if out != in {
		return false, fmt.Errorf("half captured: outbound captured %v, inbound captured %v (programs %v)", out, in, kinds)
	}
	return out, nil
}

// Directions reports which directions are captured, each whole: outbound only with
// connect4 and connect6 both attached (and getsockopt, sockops), inbound only with
// sk_lookup (and getsockopt, sockops); an error for a program attached twice, a failed
// connection, or a direction captured without all its programs.
func (c *CrashProbe) Directions(tb testing.TB) (out, in bool, kinds map[ebpf.AttachType]int, err error) {
	tb.Helper()
	kinds, err = ProgramsByKind(c.Pod)
	if err != nil {
		return false, false, nil, err
	}
	for at, n := range kinds {
		if n > 1 {
			return false, false, kinds, fmt.Errorf("%d %s programs attached: %v", n, at, kinds)
		}
	}
	outR := c.Pod.Dial(tb, AppUID, AppUID, c.Out)[0]
	inR := c.Pod.Net.Dial(tb, c.In)[0]
	who := func(r testpod.Result, proxy, bypass string) (bool, error) {
		if len(r.Hops) != 1 {
			return false, fmt.Errorf("connection to %s: %+v", r.Dst, r)
		}
		switch h := r.Hops[0]; {
		case h.Who == proxy && h.Orig == r.Dst:
			return true, nil
		case h.Who == bypass:
			return false, nil
		default:
			return false, fmt.Errorf("connection to %s reached %s with original destination %q", r.Dst, h.Who, h.Orig)
		}
	}
	if out, err = who(outR, "proxy", "remote"); err != nil {
		return false, false, kinds, err
	}
	if in, err = who(inR, "proxy", "app"); err != nil {
		return false, false, kinds, err
	}
	if out && !directionWhole(kinds, false) {
		return out, in, kinds, fmt.Errorf("outbound captured without every program: %v", kinds)
	}
	if in && !directionWhole(kinds, true) {
		return out, in, kinds, fmt.Errorf("inbound captured without every program: %v", kinds)
	}
	return out, in, kinds, nil
}

// CheckAttachedOnce checks that id is the only pod under opts' bpffs, attached exactly
// once: every kind of program once on the pod, its pin directory holds exactly the maps
// and the links opts want (loader.Plan), and no attach is left staged.
func CheckAttachedOnce(pod *testpod.Pod, opts loader.Options, id string) error {
	kinds, err := ProgramsByKind(pod)
	if err != nil {
		return err
	}
	// What opts turn off is not attached, and has no pin.
	want := loader.MapNames()
	wantKinds := map[ebpf.AttachType]int{}
	for _, l := range loader.Plan(opts) {
		want = append(want, l.Pin)
		wantKinds[l.AttachType] = 1
	}
	for _, at := range Kinds {
		if kinds[at] != wantKinds[at] {
			return fmt.Errorf("programs attached %v, want %v", kinds, wantKinds)
		}
	}
	slices.Sort(want)
	// The pod's name, where the attacher gave one, sits beside the pins.
	got := slices.DeleteFunc(names(filepath.Join(opts.BPFFS, "divert", id)), func(n string) bool { return n == loader.PodNamePin })
	if !slices.Equal(got, want) {
		return fmt.Errorf("pins of %s: %v, want %v", id, got, want)
	}
	if got := names(filepath.Join(opts.BPFFS, "divert")); !slices.Equal(got, []string{id}) {
		return fmt.Errorf("pod directories %v, want [%s]", got, id)
	}
	if got := names(filepath.Join(opts.BPFFS, "divert_staging")); len(got) != 0 {
		return fmt.Errorf("staging left behind: %v", got)
	}
	return nil
}

// CheckNothingLeft checks that no program of divert's kinds runs for the pod and no pin,
// staging directory or fallback marker is left under opts' bpffs.
func CheckNothingLeft(pod *testpod.Pod, opts loader.Options) error {
	kinds, err := ProgramsByKind(pod)
	if err != nil {
		return err
	}
	var errs []error
	for at, n := range kinds {
		if n != 0 {
			errs = append(errs, fmt.Errorf("%d %s programs still attached", n, at))
		}
	}
	for _, d := range []string{"divert", "divert_staging", "divert_fallback"} {
		if got := names(filepath.Join(opts.BPFFS, d)); len(got) != 0 {
			errs = append(errs, fmt.Errorf("%s still holds %v", d, got))
		}
	}
	return errors.Join(errs...)
}

// names lists a directory's entries (sorted; none if it does not exist).
func names(dir string) []string {
	entries, _ := os.ReadDir(dir)
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// CheckPolicy checks that the kernel holds cfg for pod id: the settings and lists that
// the crash tests change between attaches, read back from the pinned maps.
func CheckPolicy(opts loader.Options, id string, cfg *policy.Config) error {
	st, err := loader.Status(id, opts)
	if err != nil {
		return err
	}
	p := st.Policy
	var cidrs []string
	for _, c := range cfg.IPv4OutboundExcludeCIDRs() {
		cidrs = append(cidrs, c.String())
	}
	slices.Sort(cidrs)
	sorted := func(p []uint16) []uint16 { p = slices.Clone(p); slices.Sort(p); return p }
	if p.ProxyPort != cfg.ProxyPort || p.InboundCapturePort != cfg.InboundCapturePort ||
		p.OutboundIncludeAll != cfg.OutboundCIDRs.All || p.InboundIncludeAll != cfg.InboundPorts.All ||
		!slices.Equal(p.OutboundExcludePorts, sorted(cfg.OutboundExcludePorts)) ||
		!slices.Equal(p.InboundExcludePorts, sorted(cfg.InboundExcludes())) ||
		!slices.Equal(p.OutboundExcludeCIDRs, cidrs) {
		return fmt.Errorf("kernel holds %+v, want the policy %+v", p, cfg)
	}
	return nil
}

// ForceClean removes whatever a killed loader left under opts' bpffs, without the loader:
// every pinned link detached, every pin removed. Crash tests call it after a failed
// iteration, so the next one starts from nothing.
func ForceClean(opts loader.Options) error {
	var errs []error
	for _, d := range []string{"divert", "divert_staging"} {
		top := filepath.Join(opts.BPFFS, d)
		for _, sub := range names(top) {
			dir := filepath.Join(top, sub)
			for _, pin := range names(dir) {
				if l, err := link.LoadPinnedLink(filepath.Join(dir, pin), nil); err == nil {
					if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
						errs = append(errs, fmt.Errorf("detach %s/%s: %w", dir, pin, err))
					}
					l.Close()
				}
			}
			errs = append(errs, os.RemoveAll(dir))
		}
	}
	return errors.Join(errs...)
}

// KillPlan spreads the kills of one command (a child process that calls
// crashpoint.ArmFromEnv). The machine's load moves a command's steps in time, so three
// kills in four are placed by step: at a random one of its steps, or a random moment
// (under a millisecond) after it, the command going on meanwhile; the rest come from
// outside (SIGKILL) at a random time of its run.
type KillPlan struct {
	Steps int           // steps of a whole run
	Total time.Duration // shortest whole run
}

// Observe widens the plan with a whole run: its time and its output.
func (k *KillPlan) Observe(total time.Duration, output string) {
	n, _ := crashpoint.Steps(output)
	k.Steps = max(k.Steps, n)
	if k.Total == 0 || total < k.Total {
		k.Total = total
	}
}

// Kill runs cmd (not started yet) and kills it where the plan says; it returns whether
// the kill came before cmd ended and where it was aimed.
func (k KillPlan) Kill(rng *rand.Rand, cmd *exec.Cmd) (killed bool, aim string, err error) {
	var wait time.Duration
	if k.Steps > 0 && rng.IntN(4) > 0 {
		n := 1 + rng.IntN(k.Steps)
		var d int64
		if rng.IntN(3) > 0 {
			d = rng.Int64N(int64(time.Millisecond))
		}
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d,%d", crashpoint.Env, n, d))
		aim = fmt.Sprintf("%v after step %d", time.Duration(d), n)
	} else {
		cmd.Env = append(cmd.Env, crashpoint.Env+"=0,0")
		wait = time.Duration(rng.Int64N(int64(k.Total)*6/5 + 1))
		aim = fmt.Sprintf("from outside %v in", wait)
	}
	if err := cmd.Start(); err != nil {
		return false, aim, err
	}
	if wait > 0 {
		time.Sleep(wait)
		cmd.Process.Signal(syscall.SIGKILL)
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true, aim, nil
		}
	}
	return false, aim, err
}

func (k KillPlan) String() string {
	return fmt.Sprintf("%d steps in %v", k.Steps, k.Total.Round(time.Millisecond/10))
}

// ChildCmd is the test binary run again as a child a crash test can kill, with env
// (NAME=value) added to its environment and args as its arguments, not started yet; its
// stdout and stderr go to the returned buffer.
func ChildCmd(env string, args ...string) (*exec.Cmd, *bytes.Buffer) {
	cmd := exec.Command("/proc/self/exe", args...)
	cmd.Env = append(os.Environ(), env)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	return cmd, &out
}

// KillPlans runs each named command to its end twice, crash points counting only, and
// returns a plan per name from the faster run: how many steps it passes and how long it
// takes, child process start included, so kills are spread over all of it. command(i)
// is the i-th command, not started yet, and where its output goes.
func KillPlans(tb testing.TB, names []string, command func(i int) (*exec.Cmd, *bytes.Buffer)) map[string]*KillPlan {
	tb.Helper()
	plans := map[string]*KillPlan{}
	for range 2 {
		for i, name := range names {
			cmd, out := command(i)
			cmd.Env = append(cmd.Env, crashpoint.Env+"=0,0")
			start := time.Now()
			if err := cmd.Run(); err != nil {
				tb.Fatalf("%s: %v\n%s", name, err, out)
			}
			if plans[name] == nil {
				plans[name] = &KillPlan{}
			}
			plans[name].Observe(time.Since(start), out.String())
		}
	}
	for name, p := range plans {
		tb.Logf("%s: %v", name, p)
	}
	return plans
}

// CrashRand is the random source of a kill test: seeded with seed, or a new seed (logged
// with how to replay it, as flag replays) when seed is 0.
func CrashRand(tb testing.TB, seed uint64, flag string) (*rand.Rand, uint64) {
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	tb.Logf("seed %d (replay with -%s=%d)", seed, flag, seed)
	return rand.New(rand.NewPCG(seed, seed)), seed
}
