package cgroups

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
)

const (
	uid        = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
	uidSystemd = "0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0"
	ctr        = "8a1f3c5e7d9b2a4c6e8f0a1b3c5d7e9f8a1f3c5e7d9b2a4c6e8f0a1b3c5d7e9f"
)

func TestParsePath(t *testing.T) {
	cases := []struct {
		name, path string
		want       PodPath
		ok         bool
	}{
		{"cgroupfs besteffort", "/kubepods/besteffort/pod" + uid + "/" + ctr,
			PodPath{"/kubepods/besteffort/pod" + uid, uid, Cgroupfs}, true},
		{"cgroupfs burstable", "/kubepods/burstable/pod" + uid + "/" + ctr,
			PodPath{"/kubepods/burstable/pod" + uid, uid, Cgroupfs}, true},
		{"cgroupfs guaranteed (no qos level)", "/kubepods/pod" + uid + "/" + ctr,
			PodPath{"/kubepods/pod" + uid, uid, Cgroupfs}, true},
		{"cgroupfs pod itself", "/kubepods/besteffort/pod" + uid,
			PodPath{"/kubepods/besteffort/pod" + uid, uid, Cgroupfs}, true},
		{"cgroupfs under a kubelet --cgroup-root", "/kubelet/kubepods/burstable/pod" + uid + "/" + ctr,
			PodPath{"/kubelet/kubepods/burstable/pod" + uid, uid, Cgroupfs}, true},
		{"cgroupfs static pod (hash uid)", "/kubepods/burstable/pod6d3b5f0c1e2a4b7c8d9e0f1a2b3c4d5e/" + ctr,
			PodPath{"/kubepods/burstable/pod6d3b5f0c1e2a4b7c8d9e0f1a2b3c4d5e", "6d3b5f0c1e2a4b7c8d9e0f1a2b3c4d5e", Cgroupfs}, true},
		{"systemd besteffort", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidSystemd + ".slice/cri-containerd-" + ctr + ".scope",
			PodPath{"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidSystemd + ".slice", uid, Systemd}, true},
		{"systemd guaranteed", "/kubepods.slice/kubepods-pod" + uidSystemd + ".slice/crio-" + ctr + ".scope",
			PodPath{"/kubepods.slice/kubepods-pod" + uidSystemd + ".slice", uid, Systemd}, true},
		{"systemd nested prefix (kind)", "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod" + uidSystemd + ".slice/cri-containerd-" + ctr + ".scope",
			PodPath{"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod" + uidSystemd + ".slice", uid, Systemd}, true},
		{"nested clusters: innermost pod", "/kubepods/burstable/pod" + uid + "/" + ctr + "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod1111_2222.slice/cri-containerd-x.scope",
			PodPath{"/kubepods/burstable/pod" + uid + "/" + ctr + "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod1111_2222.slice", "1111-2222", Systemd}, true},
		{"pod<x> outside kubepods is not a pod", "/system.slice/pod1234/foo", PodPath{}, false},
		{"not kubernetes", "/user.slice/user-0.slice/session-1.scope", PodPath{}, false},
		{"root", "/", PodPath{}, false},
		{"relative", "kubepods/pod" + uid, PodPath{}, false},
		{"pod segment with bad characters", "/kubepods/besteffort/pod" + uid + ".x/" + ctr, PodPath{}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ok := ParsePath(c.path)
			if ok != c.ok || got != c.want {
				t.Fatalf("ParsePath(%q) = %+v, %v; want %+v, %v", c.path, got, ok, c.want, c.ok)
			}
		})
	}
}

// /proc/self/cgroup of a container on a hybrid host (kubelet and runc in v1 mode): every v1
// controller and the v2 mirror show the same path.
var hybridProc = `12:net_cls,net_prio:/kubepods/besteffort/pod` + uid + `/` + ctr + `
11:memory:/kubepods/besteffort/pod` + uid + `/` + ctr + `
1:name=systemd:/kubepods/besteffort/pod` + uid + `/` + ctr + `
0::/kubepods/besteffort/pod` + uid + `/` + ctr + `
`

func TestParseProcCgroup(t *testing.T) {
	pc, err := ParseProcCgroup(hybridProc)
	if err != nil {
		t.Fatal(err)
	}
	want := "/kubepods/besteffort/pod" + uid + "/" + ctr
	if pc.V2 != want || len(pc.V1) != 1 || pc.V1[0] != want {
		t.Fatalf("got %+v", pc)
	}
	pc, err = ParseProcCgroup("0::/a/b\n")
	if err != nil || pc.V2 != "/a/b" || pc.V1 != nil {
		t.Fatalf("unified: %+v %v", pc, err)
	}
	if _, err := ParseProcCgroup("garbage\n"); err == nil {
		t.Fatal("garbage parsed")
	}
}

func TestParseMountinfo(t *testing.T) {
	info := `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
90 80 0:38 /kubepods/besteffort/pod` + uid + `/` + ctr + ` /sys/fs/cgroup rw master:9 - cgroup2 cgroup2 rw
91 80 0:38 /../../.. /host/sys\040fs/cgroup rw - cgroup2 cgroup2 rw
`
	ms, err := ParseMountinfo(info)
	if err != nil {
		t.Fatal(err)
	}
	cg := Cgroup2Mounts(ms)
	if len(ms) != 4 || len(cg) != 3 {
		t.Fatalf("mounts %+v", ms)
	}
	if cg[0].Point != "/sys/fs/cgroup/unified" || cg[0].Root != "/" {
		t.Errorf("optional fields mishandled: %+v", cg[0])
	}
	if cg[2].Point != "/host/sys fs/cgroup" || cg[2].Root != "/../../.." {
		t.Errorf("escapes mishandled: %+v", cg[2])
	}
	if _, err := ParseMountinfo("1 2 3\n"); err == nil {
		t.Error("short line parsed")
	}
}

func TestResolve(t *testing.T) {
	p := "/kubepods/besteffort/pod" + uid + "/" + ctr
	cases := []struct {
		m    Mount
		want string
		ok   bool
	}{
		{Mount{Root: "/", Point: "/sys/fs/cgroup/unified"}, "/sys/fs/cgroup/unified" + p, true},
		{Mount{Root: "/kubepods", Point: "/mnt/kp"}, "/mnt/kp/besteffort/pod" + uid + "/" + ctr, true},
		{Mount{Root: p, Point: "/sys/fs/cgroup"}, "/sys/fs/cgroup", true},
		{Mount{Root: "/kubepods/burstable", Point: "/x"}, "", false},
		{Mount{Root: "/kube", Point: "/x"}, "", false}, // a prefix of a segment is no prefix
		{Mount{Root: "/../..", Point: "/host"}, "", false},
	}
	for _, c := range cases {
		got, ok := Resolve(c.m, p)
		if got != c.want || ok != c.ok {
			t.Errorf("Resolve(%+v) = %q, %v; want %q, %v", c.m, got, ok, c.want, c.ok)
		}
	}
}

// fakeFS is a set of cgroup directories: dirs and all their ancestors.
func fakeFS(dirs ...string) func(string) bool {
	set := map[string]bool{}
	for _, d := range dirs {
		for ; d != "/"; d = path.Dir(d) {
			set[d] = true
		}
	}
	return func(d string) bool { return set[d] }
}

func TestLocate(t *testing.T) {
	unified := Mount{Root: "/", Point: "/sys/fs/cgroup", FSType: "cgroup2"}
	hybrid := Mount{Root: "/", Point: "/sys/fs/cgroup/unified", FSType: "cgroup2"}
	hostPath := Mount{Root: "/", Point: "/host/sys/fs/cgroup", FSType: "cgroup2"}
	cfsPod := "/kubepods/besteffort/pod" + uid
	sdPod := "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidSystemd + ".slice"
	sdOwn := sdPod + "/cri-containerd-" + ctr + ".scope"

	cases := []struct {
		name   string
		proc   string
		mounts []Mount
		fs     func(string) bool
		want   Found
		errHas string
	}{
		{"cgroupfs driver, unified host", "0::" + cfsPod + "/" + ctr + "\n", []Mount{unified},
			fakeFS("/sys/fs/cgroup" + cfsPod + "/" + ctr),
			Found{"/sys/fs/cgroup" + cfsPod, "/sys/fs/cgroup" + cfsPod + "/" + ctr, uid, Cgroupfs}, ""},
		{"systemd driver, unified host", "0::" + sdOwn + "\n", []Mount{unified},
			fakeFS("/sys/fs/cgroup" + sdOwn),
			Found{"/sys/fs/cgroup" + sdPod, "/sys/fs/cgroup" + sdOwn, uid, Systemd}, ""},
		{"v1 driver mirrored into v2 (hybrid host)", hybridProc, []Mount{hybrid},
			fakeFS("/sys/fs/cgroup/unified" + cfsPod + "/" + ctr),
			Found{"/sys/fs/cgroup/unified" + cfsPod, "/sys/fs/cgroup/unified" + cfsPod + "/" + ctr, uid, Cgroupfs}, ""},
		{"v1 path found in v2 when the 0:: line is missing", strings.Replace(hybridProc, "0::/kubepods/besteffort/pod"+uid+"/"+ctr+"\n", "", 1), []Mount{hybrid},
			fakeFS("/sys/fs/cgroup/unified" + cfsPod + "/" + ctr),
			Found{"/sys/fs/cgroup/unified" + cfsPod, "/sys/fs/cgroup/unified" + cfsPod + "/" + ctr, uid, Cgroupfs}, ""},
		{"container view first, host's hostPath mount second",
			"0::" + cfsPod + "/" + ctr + "\n",
			[]Mount{{Root: cfsPod + "/" + ctr, Point: "/sys/fs/cgroup", FSType: "cgroup2"}, hostPath},
			fakeFS("/sys/fs/cgroup", "/host/sys/fs/cgroup"+cfsPod+"/"+ctr),
			Found{"/host/sys/fs/cgroup" + cfsPod, "/host/sys/fs/cgroup" + cfsPod + "/" + ctr, uid, Cgroupfs}, ""},
		{"unrecognised layout: the parent", "0::/divert-test/p1/init-ctr\n", []Mount{hybrid},
			fakeFS("/sys/fs/cgroup/unified/divert-test/p1/init-ctr"),
			Found{"/sys/fs/cgroup/unified/divert-test/p1", "/sys/fs/cgroup/unified/divert-test/p1/init-ctr", "", Parent}, ""},
		{"cgroup namespace: 0::/ has no parent to take", "0::/\n", []Mount{unified},
			fakeFS("/sys/fs/cgroup"), Found{}, "not below a Kubernetes pod cgroup"},
		{"the path is not there (host cgroupfs not mounted)", "0::" + cfsPod + "/" + ctr + "\n", []Mount{unified},
			fakeFS("/sys/fs/cgroup/other"), Found{}, "not below a Kubernetes pod cgroup under /sys/fs/cgroup"},
		{"no cgroup2 at all", "0::/\n", nil, fakeFS(), Found{}, "no cgroup2 file system"},
		{"no cgroup2: ip netns exec says how", "0::/\n", nil, fakeFS(), Found{}, "`ip netns exec`, which remounts /sys, run divert with `nsenter --net=<netns>`"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Locate(c.proc, c.mounts, c.fs)
			if c.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), c.errHas) || !errors.Is(err, ErrNotFound) {
					t.Fatalf("want error with %q, got %+v, %v", c.errHas, got, err)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("got %+v, %v\nwant %+v", got, err, c.want)
			}
		})
	}
}

// --cgroup-root names where the host's /sys/fs/cgroup is mounted; the cgroup2 mount is
// found there or below it from mountinfo, whatever its name, never by guessing "unified".
// Each case lays out a fake root directory and the mountinfo a container would see.
func TestRootMount(t *testing.T) {
	cases := []struct {
		name   string
		dirs   []string // below the fake root
		mounts []string // "<root in the hierarchy> <point below the fake root> <fstype>"
		arg    string   // --cgroup-root, below the fake root
		want   Mount    // Point below the fake root
		errIs  []error
		errHas string
	}{
		{"cgroup v2 host: the mount itself", []string{"host/sys/fs/cgroup/kubepods"},
			[]string{"/ host/sys/fs/cgroup cgroup2"}, "host/sys/fs/cgroup",
			Mount{Root: "/", Point: "host/sys/fs/cgroup", FSType: "cgroup2"}, nil, ""},
		{"hybrid host: unified below the tmpfs", []string{"host/sys/fs/cgroup/unified", "host/sys/fs/cgroup/memory", "host/sys/fs/cgroup/cpu,cpuacct"},
			[]string{"/ host/sys/fs/cgroup tmpfs", "/ host/sys/fs/cgroup/memory cgroup", "/ host/sys/fs/cgroup/cpu,cpuacct cgroup", "/ host/sys/fs/cgroup/unified cgroup2"},
			"host/sys/fs/cgroup", Mount{Root: "/", Point: "host/sys/fs/cgroup/unified", FSType: "cgroup2"}, nil, ""},
		{"hybrid host: found by type, not by the name unified", []string{"host/cg/v2", "host/cg/unified"},
			[]string{"/ host/cg tmpfs", "/ host/cg/v2 cgroup2"},
			"host/cg", Mount{Root: "/", Point: "host/cg/v2", FSType: "cgroup2"}, nil, ""},
		{"hybrid host: the unified mount given outright", []string{"host/sys/fs/cgroup/unified"},
			[]string{"/ host/sys/fs/cgroup tmpfs", "/ host/sys/fs/cgroup/unified cgroup2"},
			"host/sys/fs/cgroup/unified", Mount{Root: "/", Point: "host/sys/fs/cgroup/unified", FSType: "cgroup2"}, nil, ""},
		{"seen from a cgroup namespace: outside it, taken as the top", []string{"host/sys/fs/cgroup"},
			[]string{"/../../.. host/sys/fs/cgroup cgroup2"}, "host/sys/fs/cgroup",
			Mount{Root: "/", Point: "host/sys/fs/cgroup", FSType: "cgroup2"}, nil, ""},
		{"a subtree mounted: its root kept", []string{"host/kubepods"},
			[]string{"/kubepods host/kubepods cgroup2"}, "host/kubepods",
			Mount{Root: "/kubepods", Point: "host/kubepods", FSType: "cgroup2"}, nil, ""},
		{"the shallowest mount below wins", []string{"host/cg/unified/inner"},
			[]string{"/ host/cg tmpfs", "/ host/cg/unified cgroup2", "/x host/cg/unified/inner cgroup2"},
			"host/cg", Mount{Root: "/", Point: "host/cg/unified", FSType: "cgroup2"}, nil, ""},
		{"a later mount hides an earlier one at the same point", []string{"host/cg"},
			[]string{"/ host/cg cgroup2", "/ host/cg tmpfs"}, "host/cg",
			Mount{}, []error{ErrNoCgroup2}, ""},
		{"cgroup v1 only", []string{"host/cg/memory"},
			[]string{"/ host/cg tmpfs", "/ host/cg/memory cgroup"}, "host/cg",
			Mount{}, []error{ErrNoCgroup2, ErrV1Only}, ""},
		{"nothing mounted (the hostPath volume missing)", []string{"host/cg"}, nil, "host/cg",
			Mount{}, []error{ErrNoCgroup2}, ""},
		{"a directory inside the mount", []string{"host/cg/kubepods"},
			[]string{"/ host/cg cgroup2"}, "host/cg/kubepods",
			Mount{}, nil, "inside the cgroup2 mount"},
		{"two mounts side by side", []string{"host/cg/a", "host/cg/b"},
			[]string{"/ host/cg tmpfs", "/ host/cg/a cgroup2", "/ host/cg/b cgroup2"}, "host/cg",
			Mount{}, nil, "several cgroup2 mounts"},
		{"missing", nil, nil, "host/nope", Mount{}, []error{fs.ErrNotExist}, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tmp := t.TempDir()
			for _, d := range c.dirs {
				if err := os.MkdirAll(filepath.Join(tmp, d), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			// A mount of the real root first: the fake root lies below it and is no cgroup2.
			info := "20 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
			for i, m := range c.mounts {
				f := strings.Fields(m)
				info += fmt.Sprintf("%d 20 0:%d %s %s rw,relatime shared:%d - %s %s rw\n", 30+i, 30+i, f[0], filepath.Join(tmp, f[1]), 30+i, f[2], f[2])
			}
			mi := filepath.Join(tmp, "mountinfo")
			if err := os.WriteFile(mi, []byte(info), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := RootMount(filepath.Join(tmp, c.arg), mi)
			if c.errIs != nil || c.errHas != "" {
				for _, want := range c.errIs {
					if !errors.Is(err, want) {
						t.Errorf("want an error wrapping %v, got %+v, %v", want, got, err)
					}
				}
				if err == nil || !strings.Contains(err.Error(), c.errHas) {
					t.Errorf("want an error with %q, got %+v, %v", c.errHas, got, err)
				}
				return
			}
			c.want.Point = filepath.Join(tmp, c.want.Point)
			if err != nil || got != c.want {
				t.Fatalf("got %+v, %v\nwant %+v", got, err, c.want)
			}
		})
	}
}
