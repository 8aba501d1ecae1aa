package node

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// ErrNoCgroup means the pod's cgroup v2 directory does not exist (yet, or any more).
var ErrNoCgroup = errors.New("pod cgroup not found")

// podCgroupNames are the names a pod's cgroup directory has: the cgroupfs driver's
// pod<uid> (also how runc mirrors v1-driver pods into the v2 tree) and the systemd
// driver's kubepods[-<qos>]-pod<uid with _ for ->.slice.
func podCgroupNames(uid string) []string {
	u := strings.ReplaceAll(uid, "-", "_")
	return []string{
		"pod" + uid,
		"kubepods-pod" + u + ".slice",
		"kubepods-besteffort-pod" + u + ".slice",
		"kubepods-burstable-pod" + u + ".slice",
	}
}

// FindPodCgroup finds the pod's directory under the cgroup2 root. It looks only where the
// kubelet puts pods: kubepods[.slice] at the root, or below one level of slices (e.g.
// kubelet.slice), then the QoS level.
func FindPodCgroup(root fs.FS, uid string) (string, error) {
	names := map[string]bool{}
	for _, n := range podCgroupNames(uid) {
		names[n] = true
	}
	var found string
	err := fs.WalkDir(root, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fs.SkipDir // unreadable or vanished: not ours
		}
		if !d.IsDir() {
			return nil
		}
		if names[d.Name()] {
			found = p
			return fs.SkipAll
		}
		// Pod directories sit at most four levels down; do not wander into containers.
		if p != "." && (strings.Count(p, "/") >= 3 || strings.HasPrefix(d.Name(), "pod")) {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if found == "" {
		return "", fmt.Errorf("pod %s: %w", uid, ErrNoCgroup)
	}
	return found, nil
}

// ExpectedPodCgroup is where the cgroupfs driver (and runc's v2 mirror of it) puts the
// pod: the agent creates it when CNI ADD comes before the first container made it, so
// capture is in place before any container of the pod runs.
func ExpectedPodCgroup(pod *corev1.Pod) string {
	switch pod.Status.QOSClass {
	case corev1.PodQOSGuaranteed:
		return path.Join("kubepods", "pod"+string(pod.UID))
	case corev1.PodQOSBurstable:
		return path.Join("kubepods", "burstable", "pod"+string(pod.UID))
	default:
		return path.Join("kubepods", "besteffort", "pod"+string(pod.UID))
	}
}
