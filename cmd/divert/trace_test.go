package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// tracer is a running divert trace, in this process (stopped as SIGINT stops it) or as a
// child process (stopped with SIGKILL).
type tracer struct {
	events chan traceEvent
	stderr chan string
	said   []string // stderr before tracing was on
	stop   func() error
}

// lines feeds r's lines to out (decoded as JSON when asked) until r ends.
func feed(t *testing.T, r io.Reader, events chan<- traceEvent, text chan<- string) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if events != nil {
			var ev traceEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				t.Errorf("trace printed a line that is not a JSON object: %q", sc.Text())
				continue
			}
			events <- ev
		} else {
			text <- sc.Text()
		}
	}
	if events != nil {
		close(events)
	} else {
		close(text)
	}
}

// startTrace runs divert trace -o json with args, in process or as a child, and waits until
// it says tracing is on.
func startTrace(t *testing.T, opts loader.Options, child bool, args ...string) *tracer {
	t.Helper()
	args = append([]string{"trace", "--bpffs", opts.BPFFS, "-o", "json"}, args...)
	tr := &tracer{events: make(chan traceEvent, 100), stderr: make(chan string, 100)}
	outR, outW := io.Pipe()
	errR, errW := io.Pipe()
	go feed(t, outR, tr.events, nil)
	go feed(t, errR, nil, tr.stderr)
	if child {
		cmd, _ := cliCmd(args)
		cmd.Stdout, cmd.Stderr = outW, errW
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		waited := make(chan error, 1)
		go func() { waited <- cmd.Wait(); outW.Close(); errW.Close() }()
		tr.stop = sync.OnceValue(func() error {
			cmd.Process.Signal(syscall.SIGKILL)
			<-waited
			return nil
		})
	} else {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- run(ctx, args, env{stdout: outW, stderr: errW, getenv: func(string) string { return "" }})
			outW.Close()
			errW.Close()
		}()
		tr.stop = sync.OnceValue(func() error { cancel(); return <-done })
	}
	t.Cleanup(func() { tr.stop() })
	for {
		select {
		case l, ok := <-tr.stderr:
			if !ok {
				t.Fatalf("divert trace %v ended before tracing was on", args)
			}
			if l == traceReady {
				return tr
			}
			tr.said = append(tr.said, l)
		case <-time.After(20 * time.Second):
			t.Fatalf("divert trace %v: tracing not on after 20 s", args)
		}
	}
}

// next returns the next event, failing after a few seconds without one.
func (tr *tracer) next(t *testing.T) traceEvent {
	t.Helper()
	select {
	case ev, ok := <-tr.events:
		if !ok {
			t.Fatal("trace ended")
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no trace event within 10 s")
	}
	return traceEvent{}
}

func traceOn(t *testing.T, opts loader.Options) bool {
	t.Helper()
	on, _, err := loader.TraceOn(opts)
	if err != nil {
		t.Fatal(err)
	}
	return on
}

// A captured connection, an excluded one and an inbound one show up with the right pod,
// verdict, reason, addresses and original destination; the filters keep what they say;
// tracing goes off when trace ends, by Ctrl-C or SIGKILL, and nothing is written then.
func TestTrace(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	if _, err := runCLI(t, nil, "attach", "--pod-id", pod.Name, "--pod-name", "shop/web", "--cgroup", pod.CgroupPath,
		"--netns", pod.NetNSPath, "--bpffs", opts.BPFFS, "-o", "5432", "-b", "8080"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	any := netip.IPv4Unspecified()
	pod.StartProxy(t, testpod.ProxyConfig{Name: "proxy", Mode: "report", UID: divertest.ProxyUID, GID: divertest.ProxyUID,
		Listen: []netip.AddrPort{netip.AddrPortFrom(any, 15001), netip.AddrPortFrom(any, 15006)}})
	pod.Net.Server(t, "remote", netip.AddrPortFrom(any, 5432))
	remote, remote2 := pod.Net.Addrs[0], pod.Net.Addrs[1]
	captured := netip.AddrPortFrom(remote, 80)
	excluded := netip.AddrPortFrom(remote, 5432)

	tr := startTrace(t, opts, false)
	if !traceOn(t, opts) {
		t.Fatal("trace runs but the owner sockmap is empty")
	}
	r := pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: captured})[0]
	if len(r.Hops) != 1 || r.Hops[0].Orig != captured.String() {
		t.Fatalf("app -> %s: %+v, want the proxy reading it", captured, r)
	}
	// The source is the app's socket as the proxy sees its peer (127.0.0.1: it dialled
	// 127.0.0.1:15001 in the end).
	ev := tr.next(t)
	if ev.Pod != pod.Name || ev.PodName != "shop/web" || ev.Direction != "outbound" || ev.Protocol != "tcp" ||
		ev.Verdict != "captured" || ev.Reason != "included-cidr" || ev.Dst != captured.String() ||
		ev.To != "127.0.0.1:15001" || ev.UID == nil || *ev.UID != divertest.AppUID || *ev.GID != divertest.AppUID ||
		ev.Src != r.Hops[0].Peer {
		t.Errorf("captured connection traced as %+v", ev)
	}
	if r = pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: excluded})[0]; len(r.Hops) != 1 || r.Hops[0].Who != "remote" {
		t.Fatalf("app -> %s: %+v, want the remote server directly", excluded, r)
	}
	if ev = tr.next(t); ev.Pod != pod.Name || ev.Verdict != "passed" || ev.Reason != "excluded-outbound-port" ||
		ev.Dst != excluded.String() || ev.To != "" || ev.Src != r.Hops[0].Peer {
		t.Errorf("excluded connection traced as %+v", ev)
	}
	inbound := netip.AddrPortFrom(pod.Addr, 8080)
	if r = pod.Net.Dial(t, testpod.Target{Dst: inbound})[0]; len(r.Hops) != 1 || r.Hops[0].Listener != "0.0.0.0:15006" {
		t.Fatalf("remote -> %s: %+v, want the proxy's inbound listener", inbound, r)
	}
	if ev = tr.next(t); ev.Pod != pod.Name || ev.Direction != "inbound" || ev.Verdict != "captured" ||
		ev.Reason != "inbound-included-port" || ev.Dst != inbound.String() || ev.To != ":15006" ||
		ev.Src != r.Hops[0].Peer || !strings.HasPrefix(ev.Src, gateway(pod.Addr).String()+":") || ev.UID != nil {
		t.Errorf("inbound connection traced as %+v", ev)
	}
	// One trace at a time.
	if _, err := runCLI(t, nil, "trace", "--bpffs", opts.BPFFS); err == nil || !strings.Contains(err.Error(), "another divert trace is running") {
		t.Errorf("a second trace: %v", err)
	}
	if err := tr.stop(); err != nil {
		t.Fatalf("trace ended with %v", err)
	}
	if traceOn(t, opts) {
		t.Fatal("tracing still on after trace ended")
	}
	assertNothingWritten(t, opts, func() { pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: captured}) })

	// --verdict passed: the captured connection is not shown, the next passed one is.
	tr = startTrace(t, opts, false, "--verdict", "passed", "--pod", "shop/web")
	pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: captured}, testpod.Target{Dst: excluded})
	if ev = tr.next(t); ev.Verdict != "passed" || ev.Dst != excluded.String() {
		t.Errorf("--verdict passed showed %+v first", ev)
	}
	tr.stop()
	// --addr: only connections from or to remote2; --verdict by reason.
	tr = startTrace(t, opts, false, "--addr", remote2.String()+"/32", "--verdict", "included-cidr")
	other := netip.AddrPortFrom(remote2, 80)
	pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: captured}, testpod.Target{Dst: excluded}, testpod.Target{Dst: other})
	if ev = tr.next(t); ev.Dst != other.String() || ev.Reason != "included-cidr" {
		t.Errorf("--addr %s showed %+v first", remote2, ev)
	}
	tr.stop()

	// Killed: the kernel empties the owner sockmap with the process's sockets.
	tr = startTrace(t, opts, true)
	if !traceOn(t, opts) {
		t.Fatal("trace (child) runs but tracing is off")
	}
	tr.stop()
	for deadline := time.Now().Add(5 * time.Second); traceOn(t, opts); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("tracing still on 5 s after trace was killed")
		}
	}
	assertNothingWritten(t, opts, func() { pod.Dial(t, divertest.AppUID, divertest.AppUID, testpod.Target{Dst: captured}) })

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--pod", "nosuch"}, `invalid --pod "nosuch"`},
		{[]string{"--verdict", "maybe"}, `invalid --verdict "maybe"`},
		{[]string{"--addr", "10.0.0.300"}, `invalid --addr "10.0.0.300"`},
		{[]string{"-o", "yaml"}, `invalid -o/--output "yaml"`},
	} {
		_, err := runCLI(t, nil, append([]string{"trace", "--bpffs", opts.BPFFS}, c.args...)...)
		if err == nil || !strings.HasPrefix(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("trace %v: %v, want one line starting %q", c.args, err, c.want)
		}
	}
	if traceOn(t, opts) {
		t.Error("a refused trace left tracing on")
	}
}

// gateway is the remote end of a test pod's veth, the source of its inbound connections
// (testpod: 198.18.k.1 for the pod 198.18.k.2).
func gateway(pod netip.Addr) netip.Addr {
	a := pod.As4()
	a[3] = 1
	return netip.AddrFrom4(a)
}

// assertNothingWritten drains the node's ring buffer, runs traffic with tracing off, and
// checks that the programs wrote nothing, not even a lost record.
func assertNothingWritten(t *testing.T, opts loader.Options, traffic func()) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(opts.BPFFS, "divert_trace", "trace_events"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var rec ringbuf.Record
	read := func() error {
		rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
		return rd.ReadInto(&rec)
	}
	for read() == nil { // what the last tracer left unread
	}
	traffic()
	if err := read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("tracing off, but the programs wrote to the ring buffer (%v, %d bytes)", err, len(rec.RawSample))
	}
}

// A pod whose programs do not write to the node's ring buffer (attached by a divert older
// than trace, here: attached before the node's maps were made anew) is named as not seen;
// attaching it again swaps its programs for ones that write there.
func TestTraceNamesPodsItCannotSee(t *testing.T) {
	net := testpod.NewNetwork(t)
	old, cur := net.AddPod(t), net.AddPod(t)
	opts := divertest.BPFFS(t)
	attach := func(p *testpod.Pod) {
		t.Helper()
		if _, err := runCLI(t, nil, "attach", "--pod-id", p.Name, "--cgroup", p.CgroupPath, "--netns", p.NetNSPath, "--bpffs", opts.BPFFS); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { loader.Detach(p.Name, opts) })
	}
	attach(old)
	if err := os.RemoveAll(filepath.Join(opts.BPFFS, "divert_trace")); err != nil {
		t.Fatal(err)
	}
	attach(cur)
	notSeen := func() []string {
		t.Helper()
		tr := startTrace(t, opts, false)
		tr.stop()
		return tr.said
	}
	want := "trace: pod " + old.Name + " not seen: attached by a divert older than trace; attach it again to see it"
	if got := notSeen(); len(got) != 1 || got[0] != want {
		t.Errorf("trace said %q, want only %q", got, want)
	}
	attach(old)
	if got := notSeen(); len(got) != 0 {
		t.Errorf("after attaching %s again trace said %q", old.Name, got)
	}
}
