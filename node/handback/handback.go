// Package handback moves pods from divert's programs back to istio's iptables rules, live
// (divert to-iptables). It has no Kubernetes dependencies, so the divert binary, which is
// also the init container, need not link them: its start-up is every pod's.
package handback

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

// Going back from divert to istio's iptables rules, live: for each attached pod, istio's
// rules for the policy its maps hold are applied in its netns first, and its programs are
// detached after, so every new connection is captured by one or both (see node/migrate.go
// for why both together capture as either does). docs/install.md, "Migration".

// Options say which pods to hand back to iptables, and where their state lives.
type Options struct {
	// Loader says where the pins live.
	Loader loader.Options
	// CgroupRoot is the cgroup2 mount (as this process sees the host's): a pod's netns is
	// found through a process in the cgroup its programs are attached to.
	CgroupRoot string
	// IDs are the pods to hand back; none means every attached pod.
	IDs []string
	// DryRun only says what would be done.
	DryRun bool
}

// Result is what happened to one pod.
type Result struct {
	ID string
	// NetNS is the pod's network namespace as found; Backend holds istio's rules now.
	NetNS   string
	Backend iptables.Backend
	// Skipped says why nothing was done to a pod whose programs the kernel already
	// detached (its pod is gone; divert gc removes the pins).
	Skipped string
	// Err is why the pod was refused or failed; it is left as it was (captured by divert),
	// or, when only the detach failed, captured by both.
	Err error
}

// Run moves pods from divert's programs to istio's iptables rules, one at a time,
// reporting each; it returns an error when any pod was refused or failed. Run it where no
// node agent runs: an agent would capture its selected pods again (and remove the rules).
func Run(ctx context.Context, o Options, report func(Result)) error {
	ids := o.IDs
	if len(ids) == 0 {
		var err error
		if ids, err = loader.List(o.Loader); err != nil {
			return err
		}
	}
	failed := 0
	for _, id := range ids {
		r := handBackPod(ctx, id, o)
		if r.Err != nil {
			failed++
		}
		report(r)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d pods not handed back to iptables (each is still captured; see above)", failed, len(ids))
	}
	return nil
}

func handBackPod(ctx context.Context, id string, o Options) (r Result) {
	r.ID = id
	st, err := loader.Status(id, o.Loader)
	if err != nil {
		r.Err = err
		return r
	}
	if st.Defunct {
		r.Skipped = st.Health
		return r
	}
	cfg, err := renderablePolicy(id, st, o.Loader)
	if err != nil {
		r.Err = err
		return r
	}
	if r.NetNS, err = netnsOf(st, o.CgroupRoot); err != nil {
		r.Err = err
		return r
	}
	// Held open: the path through the process found may go while the rules are written.
	f, err := os.Open(r.NetNS)
	if err != nil {
		r.Err = fmt.Errorf("pod %s: %w", id, err)
		return r
	}
	defer f.Close()
	netns := fmt.Sprintf("/proc/self/fd/%d", f.Fd())
	addrs, err := loader.LocalAddrs(netns)
	if err != nil {
		r.Err = err
		return r
	}
	for _, a := range addrs {
		// A pod with an IPv6 address whose policy is IPv4-only (a dual-stack pod without
		// dual stack) gets IPv4 rules only from istio too, so the maps hold all of it.
		// Handing back a policy that captures IPv6 is not proven yet: refused.
		if cfg.IPv6 && a.Is6() && !a.Is4In6() && !a.IsLoopback() && !a.IsLinkLocalUnicast() {
			r.Err = fmt.Errorf("pod %s has IPv6 address %s and its policy captures IPv6, which to-iptables does not hand back yet; restart it with istio-init instead", id, a)
			return r
		}
	}
	if o.DryRun {
		return r
	}
	res, err := iptables.Apply(ctx, netns, &cfg)
	if err != nil {
		r.Err = fmt.Errorf("pod %s: istio's rules could not be applied (the pod is left captured by divert): %w", id, err)
		return r
	}
	r.Backend = res.Backend
	if err := loader.Detach(id, o.Loader); err != nil && !errors.Is(err, loader.ErrNotAttached) {
		r.Err = fmt.Errorf("pod %s: istio's rules are in place, but divert's programs could not be detached (both capture it; run again): %w", id, err)
	}
	return r
}

// renderablePolicy is the pod's policy as its maps hold it, refused where they do not hold
// all istio's rules would need.
func renderablePolicy(id string, st *loader.PodStatus, opts loader.Options) (policy.Config, error) {
	if st.Inert {
		return policy.Config{}, fmt.Errorf("pod %s: its attach was interrupted and its maps hold no policy; attach it again (restart the node agent) first", id)
	}
	m, err := loader.OpenMaps(id, opts)
	if err != nil {
		return policy.Config{}, err
	}
	defer m.Close()
	cfg, _, err := maps.ReadPolicy(m)
	if err != nil {
		return policy.Config{}, fmt.Errorf("pod %s: %w", id, err)
	}
	if cfg.Mode == policy.TProxy {
		return policy.Config{}, fmt.Errorf("pod %s captures in TPROXY mode, whose mark and route table its maps do not hold; restart it with istio-init instead", id)
	}
	if err := cfg.Validate(); err != nil {
		return policy.Config{}, fmt.Errorf("pod %s: its policy cannot be rendered as iptables rules: %w", id, err)
	}
	return cfg, nil
}

// netnsOf finds the netns of the pod whose programs st describes: through a process in the
// cgroup they are attached to, checked against the netns its sk_lookup program is in.
func netnsOf(st *loader.PodStatus, cgroupRoot string) (string, error) {
	var cgID, nsIno uint64
	for _, p := range st.Programs {
		cgID, nsIno = max(cgID, p.CgroupID), max(nsIno, p.NetNSIno)
	}
	if cgID == 0 {
		return "", fmt.Errorf("pod %s has no program attached to a cgroup", st.ID)
	}
	dir, err := cgroups.DirByID(cgroupRoot, cgID)
	if err != nil {
		return "", fmt.Errorf("pod %s: cgroup %d not found under %s: %w", st.ID, cgID, cgroupRoot, err)
	}
	var found string
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || found != "" || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(f)
			ns := fmt.Sprintf("/proc/%d/ns/net", pid)
			var fi unix.Stat_t
			if pid > 0 && unix.Stat(ns, &fi) == nil && (nsIno == 0 || fi.Ino == nsIno) {
				found = ns
				return filepath.SkipAll
			}
		}
		return nil
	})
	if err == nil && found == "" {
		err = errors.New("no process of it runs in its network namespace (run this in the host's PID namespace)")
	}
	if err != nil {
		return "", fmt.Errorf("pod %s: find its netns from cgroup %s: %w", st.ID, dir, err)
	}
	return found, nil
}
