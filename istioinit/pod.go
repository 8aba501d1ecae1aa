package istioinit

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/loader"
)

// The pod: its cgroup, pin id and name, its families, and whether eBPF can capture it.

// pod finds the pod's cgroup and pin id (--cgroup and --pod-id override).
func (r *run) pod() (loader.Pod, string, error) {
	pod := loader.Pod{ID: r.podID, Cgroup: r.cgroupFl, NetNS: OwnNetNS}
	var err error
	if pod.Name, err = r.podName(); err != nil {
		return pod, "", err
	}
	if pod.Cgroup != "" {
		if pod.ID == "" {
			if pp, ok := cgroups.ParsePath(pod.Cgroup); ok {
				pod.ID = pp.UID
			}
		}
		if pod.ID == "" {
			return pod, "", fmt.Errorf("missing --%s: --%s %s names no pod UID (no kubepods pod<uid> directory)", FlagPodID, FlagCgroup, pod.Cgroup)
		}
		return pod, fmt.Sprintf("given by --%s", FlagCgroup), nil
	}
	found, err := r.e.FindPod(cgroups.Finder{Root: r.root})
	if err != nil {
		return pod, "", fmt.Errorf("%w; mount the host's /sys/fs/cgroup and pass --%s (or $DIVERT_CGROUP_ROOT), or pass --%s (or $DIVERT_CGROUP)", err, FlagCgroupRoot, FlagCgroup)
	}
	pod.Cgroup = found.Pod
	how := fmt.Sprintf("%s layout, this process in %s", found.Driver, found.Own)
	if pod.ID == "" {
		pod.ID = found.UID
	}
	if found.Driver == cgroups.Parent && r.podID == "" {
		return pod, "", fmt.Errorf("missing --%s: this process's cgroup %s is not in a Kubernetes pod layout (kubepods/.../pod<uid>); pass --%s to capture its parent %s, or --%s",
			FlagPodID, found.Own, FlagPodID, found.Pod, FlagCgroup)
	}
	return pod, how, nil
}

// podName is the pod's namespace/name for divert status, from the downward API's
// $POD_NAMESPACE and $POD_NAME (divert's injector template sets them; Istio's istio-init
// has neither), or "" without them.
func (r *run) podName() (string, error) {
	ns, name := r.e.Getenv("POD_NAMESPACE"), r.e.Getenv("POD_NAME")
	if ns == "" || name == "" {
		return "", nil
	}
	if err := loader.CheckPodName(ns + "/" + name); err != nil {
		return "", fmt.Errorf("invalid $POD_NAMESPACE/$POD_NAME %q: not a Kubernetes namespace and pod name; set them from the downward API (metadata.namespace, metadata.name), or unset them", ns+"/"+name)
	}
	return ns + "/" + name, nil
}

// ebpfUnavailable says why the eBPF backend cannot be used here, or nil.
func (r *run) ebpfUnavailable() error {
	if v := r.e.Getenv(ForceNoEBPFEnv); v == "1" {
		return fmt.Errorf("turned off by $%s=1 (a test hook): %w", ForceNoEBPFEnv, ebpf.ErrNotSupported)
	}
	if r.e.InUserNS() {
		return fmt.Errorf("this pod runs in a user namespace (hostUsers: false): the proxy's uid seen by eBPF is the host's, not -u %d: %w", r.cfg.ProxyUID, ebpf.ErrNotSupported)
	}
	if err := r.e.Probe(r.lopts); err != nil {
		return err
	}
	// What the programs cannot express of the settings falls back like what the kernel lacks.
	return r.e.CheckPolicy(&r.cfg)
}

// checkCgroupRoot checks --cgroup-root ($DIVERT_CGROUP_ROOT): a missing or wrong path is
// the pod spec's mistake (a hostPath volume missing or mounted elsewhere) and fails; a
// host that has no cgroup v2 hierarchy at all (cgroup v1 only) is a reason for iptables
// and wraps ebpf.ErrNotSupported.
func (r *run) checkCgroupRoot() error {
	if r.root == "" {
		return nil
	}
	if _, err := os.Stat(r.root); err != nil {
		return fmt.Errorf("invalid %s %q: %v; mount the host's /sys/fs/cgroup there (a hostPath volume), or unset it", r.rootSrc, r.root, unwrapPath(err))
	}
	_, err := cgroups.RootMount(r.root, "")
	switch {
	case err == nil:
		return nil
	case errors.Is(err, cgroups.ErrV1Only):
		return fmt.Errorf("%s %q: %v: %w", r.rootSrc, r.root, err, ebpf.ErrNotSupported)
	}
	return fmt.Errorf("invalid %s %q: %v; point it at where the host's /sys/fs/cgroup is mounted", r.rootSrc, r.root, err)
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// pinned reports whether the pod has a pin directory; checked before Detach, which would
// mount a bpffs at the default place just to find it empty.
func pinned(opts loader.Options, id string) bool {
	_, err := os.Stat(loader.PinDir(opts, id))
	return err == nil
}

// knownPodID is the pod id when it can be known without failing: --pod-id, or the UID
// from the cgroup path.
func (r *run) knownPodID() string {
	if r.podID != "" {
		return r.podID
	}
	if pod, _, err := r.pod(); err == nil {
		return pod.ID
	}
	return ""
}
