package clierr

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The DaemonSet passes the host's /sys/fs/cgroup as mounted in the agent's container; on a
// hybrid host the agent works in the cgroup2 mount below it, found from mountinfo.
func TestCgroupRoot(t *testing.T) {
	tmp := t.TempDir()
	root := filepath.Join(tmp, "host/sys/fs/cgroup")
	for _, d := range []string{"unified", "memory"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(info string) string {
		p := filepath.Join(tmp, "mountinfo")
		if err := os.WriteFile(p, []byte(info), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hybrid := write("20 1 8:1 / / rw - ext4 /dev/sda1 rw\n" +
		"30 20 0:30 / " + root + " rw - tmpfs tmpfs rw\n" +
		"31 30 0:31 / " + root + "/memory rw - cgroup cgroup rw,memory\n" +
		"32 30 0:32 / " + root + "/unified rw - cgroup2 cgroup2 rw\n")
	if got, err := CgroupRoot(root, hybrid); err != nil || got != filepath.Join(root, "unified") {
		t.Errorf("hybrid host: got %q, %v; want %s/unified", got, err, root)
	}
	pure := write("20 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 20 0:30 / " + root + " rw - cgroup2 cgroup2 rw\n")
	if got, err := CgroupRoot(root, pure); err != nil || got != root {
		t.Errorf("cgroup v2 host: got %q, %v; want %s", got, err, root)
	}
	none := write("20 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
	if _, err := CgroupRoot(root, none); err == nil || !strings.Contains(err.Error(), "invalid --cgroup-root") || strings.Contains(err.Error(), "\n") {
		t.Errorf("no cgroup2 there: want one line naming --cgroup-root, got %v", err)
	}
}
