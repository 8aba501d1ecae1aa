package loader

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/test/testpod"
)

// listeningInodes (sock_diag) and its fallback (/proc/net/tcp and tcp6) find exactly the
// TCP sockets of both families listening on the port, SO_REUSEPORT groups, specific
// addresses and IPv6-only sockets included; not other ports, bound sockets that do not
// listen, or connections on the port.
func TestListeningInodesMatchProcNetTCP(t *testing.T) {
	pod := testpod.New(t)
	const port = 15006
	var want []uint64
	socket := func(family int, addr unix.Sockaddr, listen bool) uint64 {
		t.Helper()
		fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			t.Fatal(err)
		}
		if v6, ok := addr.(*unix.SockaddrInet6); ok && v6.Addr == ([16]byte{}) {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
				t.Fatal(err)
			}
		}
		if err := unix.Bind(fd, addr); err != nil {
			t.Fatal(err)
		}
		if listen {
			if err := unix.Listen(fd, 8); err != nil {
				t.Fatal(err)
			}
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	err := nsexec.Do(pod.NetNSPath, func() error {
		lo := [4]byte{127, 0, 0, 1}
		lo6 := [16]byte{15: 1}
		want = append(want,
			socket(unix.AF_INET, &unix.SockaddrInet4{Port: port}, true),
			socket(unix.AF_INET, &unix.SockaddrInet4{Port: port}, true), // a reuseport group
			socket(unix.AF_INET, &unix.SockaddrInet4{Port: port, Addr: lo}, true),
			socket(unix.AF_INET6, &unix.SockaddrInet6{Port: port}, true), // IPv6-only [::]
			socket(unix.AF_INET6, &unix.SockaddrInet6{Port: port, Addr: lo6}, true))
		socket(unix.AF_INET, &unix.SockaddrInet4{Port: 15001}, true)
		socket(unix.AF_INET6, &unix.SockaddrInet6{Port: 15001}, true)
		socket(unix.AF_INET, &unix.SockaddrInet4{Port: port, Addr: pod.Addr.As4()}, false)
		// A connection to the port: its accepted end has local port 15006 too.
		c, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		t.Cleanup(func() { unix.Close(c) })
		return unix.Connect(c, &unix.SockaddrInet4{Port: port, Addr: lo})
	})
	if err != nil {
		t.Fatal(err)
	}

	got, err := listeningInodes(pod.NetNSPath, port)
	if err != nil {
		t.Fatal(err)
	}
	proc := map[uint64]bool{}
	if err := nsexec.Do(pod.NetNSPath, func() error { return procNetTCPListeners(port, proc) }); err != nil {
		t.Fatal(err)
	}
	slices.Sort(want)
	if g := slices.Sorted(maps.Keys(got)); !slices.Equal(g, want) {
		t.Errorf("sock_diag found %v, want %v", g, want)
	}
	if p := slices.Sorted(maps.Keys(proc)); !slices.Equal(p, want) {
		t.Errorf("/proc/net/tcp and tcp6 fallback found %v, want %v", p, want)
	}
	// Another namespace's listeners are not this one's.
	if other, err := listeningInodes(testpod.New(t).NetNSPath, port); err != nil || len(other) != 0 {
		t.Errorf("empty netns: %v, %v", other, err)
	}
}

// socketOwners finds a socket's holder in the pod's cgroup first and, if it is not there,
// anywhere in /proc within the network namespace; never one in another namespace.
func TestSocketOwners(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var sock, ns unix.Stat_t
	if err := unix.Fstat(fd, &sock); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat("/proc/self/ns/net", &ns); err != nil {
		t.Fatal(err)
	}
	pod := testpod.New(t)                        // its cgroup has no processes
	own, err := os.ReadFile("/proc/self/cgroup") // "0::/path" on the unified hierarchy
	if err != nil {
		t.Fatal(err)
	}
	var ownCgroup string
	for _, line := range strings.Split(strings.TrimSpace(string(own)), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			// pod.CgroupPath is <cgroup2 mount>/divert-test/<name>.
			ownCgroup = filepath.Join(filepath.Dir(filepath.Dir(pod.CgroupPath)), rest)
		}
	}
	if _, err := os.Stat(filepath.Join(ownCgroup, "cgroup.procs")); err != nil {
		t.Fatalf("this process's cgroup v2 directory: %v", err)
	}
	want := []fdOwner{{os.Getpid(), fd}}
	for _, c := range []struct{ name, cgroup string }{{"own cgroup", ownCgroup}, {"pod cgroup", pod.CgroupPath}, {"no cgroup", ""}} {
		got, err := socketOwners(ns.Ino, c.cgroup, map[uint64]bool{sock.Ino: true})
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("%s: %v, %v; want %v", c.name, got, err, want)
		}
	}
	var podNS unix.Stat_t
	if err := unix.Stat(pod.NetNSPath, &podNS); err != nil {
		t.Fatal(err)
	}
	if got, err := socketOwners(podNS.Ino, ownCgroup, map[uint64]bool{sock.Ino: true}); err != nil || len(got) != 0 {
		t.Errorf("another netns: %v, %v; want none", got, err)
	}
}
