package clierr

import (
	"fmt"

	"github.com/meshdivert/divert/internal/cgroups"
)

// CgroupRoot turns --cgroup-root (divert-node's, divert to-iptables') into the cgroup2 mount
// to work in: found at or below it in mountinfo (the DaemonSet mounts the host's
// /sys/fs/cgroup, which is the cgroup2 mount on a cgroup v2 host and holds it, as "unified",
// on a hybrid one); without the flag, the first cgroup2 mount. Here, not in either command,
// because both binaries phrase the flag alike.
func CgroupRoot(flag, mountinfo string) (string, error) {
	if flag == "" {
		m, err := cgroups.Mountpoint()
		if err != nil {
			return "", fmt.Errorf("%w (pass --cgroup-root where the host's /sys/fs/cgroup is mounted)", err)
		}
		return m, nil
	}
	m, err := cgroups.RootMount(flag, mountinfo)
	if err != nil {
		return "", fmt.Errorf("invalid --cgroup-root %q: %v; pass where the host's /sys/fs/cgroup is mounted", flag, err)
	}
	return m.Point, nil
}
