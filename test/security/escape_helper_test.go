package security

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/test/testpod"
)

// The escape helper is the pod's process in the escape tests (escape_test.go): started in
// the pod's netns and cgroup, it does what an order says and reports where each of its
// connections landed and what stopped each step.

// order is what the escape helper is told to do.
type order struct {
	Mode string `json:"mode"` // passed-socket, move, cgroupns, raw-syn, idle
	Dst  string `json:"dst"`  // where the app connects
	// Cgroup is a cgroup directory outside the pod, on the host's cgroupfs (move, cgroupns).
	Cgroup string `json:"cgroup,omitempty"`
	// Mount is an empty directory to mount a fresh cgroup2 on (cgroupns), and Child the
	// name of a cgroup below the pod's that the helper moves into through that mount.
	Mount string `json:"mount,omitempty"`
	Child string `json:"child,omitempty"`
	Src   string `json:"src,omitempty"` // raw-syn: the pod's address and port the SYN claims
}

// landing is one connection's outcome: the first line its listener wrote, or the error.
type landing struct {
	Hop testpod.Hop `json:"hop"`
	Err string      `json:"err,omitempty"`
}

// report is what the escape helper prints.
type report struct {
	Steps []attack `json:"steps"`           // each step and what stopped it ("" if it worked)
	Own   *landing `json:"own,omitempty"`   // a socket the helper made itself, before any trick
	Trick *landing `json:"trick,omitempty"` // the connection the trick made
	Self  string   `json:"cgroup"`          // /proc/self/cgroup's v2 path at the end
	Procs []int    `json:"procs,omitempty"` // cgroupns: the fresh mount root's cgroup.procs
	// Visible is every cgroup below the fresh mount's root (cgroupns), relative to it.
	Visible []string `json:"visible,omitempty"`
	Pid     int      `json:"pid"`
}

// runEscape is the escape helper: its one argument is the order, as JSON.
func runEscape(args []string) error {
	var o order
	if len(args) != 1 {
		return errors.New("usage: escape ORDER-JSON")
	}
	if err := json.Unmarshal([]byte(args[0]), &o); err != nil {
		return err
	}
	r := report{Pid: os.Getpid()}
	step := func(what string, err error) {
		s := ""
		if err != nil {
			s = err.Error()
		}
		r.Steps = append(r.Steps, attack{what, s})
	}
	connect := func(fd int) *landing {
		l := land(fd, o.Dst)
		return &l
	}
	own := func() *landing {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return &landing{Err: err.Error()}
		}
		return connect(fd)
	}
	switch o.Mode {
	case "idle": // a process that only has to exist somewhere (outsiders_test.go)
		time.Sleep(time.Hour)
	case "passed-socket":
		// fd 3 is a unix socket; the test sends a TCP socket it made outside the pod's cgroup.
		r.Own = own()
		fd, err := receiveFD(3)
		step("receive a TCP socket over SCM_RIGHTS", err)
		if err == nil {
			r.Trick = connect(fd)
		}
	case "move":
		r.Own = own()
		step("move itself to "+o.Cgroup, moveTo(o.Cgroup))
		r.Trick = own()
	case "cgroupns":
		// Started in a new cgroup and mount namespace, as a container is.
		step("mount a fresh cgroup2", unix.Mount("cgroup2", o.Mount, "cgroup2", 0, ""))
		r.Procs = readProcs(filepath.Join(o.Mount, "cgroup.procs"))
		_ = filepath.WalkDir(o.Mount, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() && p != o.Mount {
				r.Visible = append(r.Visible, strings.TrimPrefix(p, o.Mount+"/"))
			}
			return nil
		})
		r.Own = own()
		step("move itself to "+o.Cgroup+" through the host's cgroupfs", moveTo(o.Cgroup))
		step("move itself to "+o.Child+" below its mount's root", moveTo(filepath.Join(o.Mount, o.Child)))
		r.Trick = own()
	case "raw-syn":
		r.Own = own()
		src, dst := netip.MustParseAddrPort(o.Src), netip.MustParseAddrPort(o.Dst)
		payload, err := rawHandshake(src, dst, nil, true)
		step("hand-made handshake from a raw socket (IP_HDRINCL)", err)
		l := &landing{}
		if err == nil {
			if err := json.Unmarshal([]byte(strings.SplitN(payload, "\n", 2)[0]), &l.Hop); err != nil {
				l.Err = fmt.Sprintf("listener's line %q: %v", payload, err)
			}
		} else {
			l.Err = err.Error()
		}
		r.Trick = l
	default:
		return fmt.Errorf("unknown mode %q", o.Mode)
	}
	r.Self = selfCgroup()
	return json.NewEncoder(os.Stdout).Encode(r)
}

// land connects fd (a TCP socket, closed here) to dst and reads the listener's first line.
func land(fd int, dst string) landing {
	ap := netip.MustParseAddrPort(dst)
	tv := unix.Timeval{Sec: 3}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		unix.Close(fd)
		return landing{Err: "connect: " + err.Error()}
	}
	f := os.NewFile(uintptr(fd), "conn")
	defer f.Close()
	line, err := bufio.NewReader(f).ReadBytes('\n')
	if err != nil {
		return landing{Err: fmt.Sprintf("read: %v (%q)", err, line)}
	}
	var l landing
	if err := json.Unmarshal(line, &l.Hop); err != nil {
		l.Err = fmt.Sprintf("listener's line %q: %v", line, err)
	}
	return l
}

func receiveFD(unixFD int) (int, error) {
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(unixFD, make([]byte, 1), oob, 0)
	if err != nil {
		return -1, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return -1, fmt.Errorf("no SCM_RIGHTS message: %v", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return -1, fmt.Errorf("no fd in SCM_RIGHTS: %v", err)
	}
	return fds[0], nil
}

// moveTo moves the whole process to the cgroup dir, as `echo $$ > dir/cgroup.procs`.
func moveTo(dir string) error {
	f, err := os.OpenFile(filepath.Join(dir, "cgroup.procs"), os.O_WRONLY, 0) // never creates it
	if err != nil {
		return err
	}
	_, err = f.WriteString(strconv.Itoa(os.Getpid()))
	return errors.Join(err, f.Close())
}

func readProcs(path string) []int {
	b, _ := os.ReadFile(path)
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			pids = append(pids, n)
		}
	}
	return pids
}

func selfCgroup() string {
	b, _ := os.ReadFile("/proc/self/cgroup")
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return p
		}
	}
	return ""
}

// escape runs the escape helper as root (all capabilities: root in a container that was
// not made to drop them) in pod's netns and cgroup, with extra files and clone flags if
// given, and returns its report. before runs once the helper started (e.g. to send it a
// socket).
func escape(t *testing.T, pod *testpod.Pod, o order, extra []*os.File, unshare uintptr, before func() error) report {
	t.Helper()
	arg, _ := json.Marshal(o)
	cg, err := unix.Open(pod.CgroupPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cg)
	cmd := testpod.HelperCommand("escape", string(arg))
	cmd.ExtraFiles = extra
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Born in the pod's cgroup (clone3 CLONE_INTO_CGROUP); a cgroup namespace unshared
	// after that is rooted there, as a container's is at its own cgroup.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg, Unshareflags: unshare, Pdeathsig: syscall.SIGKILL}
	if err := nsexec.Start(pod.NetNSPath, cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var beforeErr error
	if before != nil {
		beforeErr = before()
	}
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill() // by its PID; Wait reaps it
		err = errors.Join(errors.New("escape helper timed out"), <-done)
	}
	if err != nil || beforeErr != nil {
		t.Fatalf("escape helper: %v %v\nstdout: %s\nstderr: %s", err, beforeErr, stdout.String(), stderr.String())
	}
	var r report
	if err := json.Unmarshal([]byte(stdout.String()), &r); err != nil {
		t.Fatalf("escape helper's report %q: %v (stderr %s)", stdout.String(), err, stderr.String())
	}
	for _, s := range r.Steps {
		t.Logf("%s: %s", s.What, or(s.Err, "done"))
	}
	return r
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// socketPair returns the test's end and the helper's end (as its fd 3) of a unix socket.
func socketPair(t *testing.T) (*net.UnixConn, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours := os.NewFile(uintptr(fds[0]), "ours")
	defer ours.Close()
	c, err := net.FileConn(ours)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "theirs")
	t.Cleanup(func() { c.Close(); theirs.Close() })
	return c.(*net.UnixConn), theirs
}
