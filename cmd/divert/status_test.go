package main

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/version"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// status is the truth about a pod: one health line, the listener inbound capture steers to
// (or that there is none, and what that costs), what was dropped, which directions are on,
// defunct in JSON too.
func TestStatusTellsTheTruth(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	if _, err := runCLI(t, nil, "attach", "--pod-id", pod.Name, "--pod-name", "shop/web-0.v2", "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loader.Detach(pod.Name, opts) })
	status := func() (loader.PodStatus, string) {
		t.Helper()
		out, err := runCLI(t, nil, "status", "--bpffs", opts.BPFFS, "--pod-id", pod.Name, "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		var st []loader.PodStatus
		if err := json.Unmarshal([]byte(out), &st); err != nil || len(st) != 1 {
			t.Fatalf("status json: %v\n%s", err, out)
		}
		text, err := runCLI(t, nil, "status", "--bpffs", opts.BPFFS, "--pod-id", pod.Name)
		if err != nil {
			t.Fatal(err)
		}
		return st[0], text
	}

	// The pod's namespace/name, as the attacher gave it; an update without one keeps it,
	// a malformed one changes nothing.
	st, text := status()
	if st.Pod != "shop/web-0.v2" || !strings.HasPrefix(text, "pod "+pod.Name+" (shop/web-0.v2)\n") {
		t.Errorf("pod name: json %q, text:\n%s", st.Pod, text)
	}
	// Nothing in the pod's netns outside its cgroup, and status could look (the full check
	// is test/security's TestStatusFindsProcessesOutsideTheCgroup).
	if st.OutsideCgroupUnchecked != "" || len(st.OutsideCgroup) > 0 || strings.Contains(text, "  outside  ") {
		t.Errorf("processes outside the cgroup: %v (unchecked: %q), text:\n%s", st.OutsideCgroup, st.OutsideCgroupUnchecked, text)
	}
	if _, err := runCLI(t, nil, "attach", "--pod-id", pod.Name, "--pod-name", "Shop/web", "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS); err == nil ||
		err.Error() != `invalid --pod-name "Shop/web": use the pod's namespace/name, like default/web-0` {
		t.Errorf("malformed --pod-name: %v", err)
	}
	if _, err := runCLI(t, nil, "attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS); err != nil {
		t.Fatal(err)
	}
	if st, _ = status(); st.Pod != "shop/web-0.v2" {
		t.Errorf("after an update without --pod-name: %q", st.Pod)
	}

	// No proxy yet: an inbound connection is refused, and status says why and counts it.
	inbound := testpod.Target{Dst: netip.AddrPortFrom(pod.Addr, 8080)}
	if r := pod.Net.Dial(t, inbound)[0]; r.Err == "" {
		t.Fatalf("inbound with no proxy listening was not refused: %+v", r)
	}
	st, text = status()
	if st.Listeners == nil || *st.Listeners != 0 || !strings.HasPrefix(st.Health, "degraded: no proxy listening on :15006") ||
		st.Drops["inbound-no-listener"] != 1 || st.Defunct {
		t.Errorf("no listener: health %q, listeners %v, drops %v, defunct %v", st.Health, st.Listeners, st.Drops, st.Defunct)
	}
	if !strings.Contains(text, "health   degraded: no proxy listening") || !strings.Contains(text, "0 proxy listener(s)") ||
		!strings.Contains(text, "inbound-no-listener 1") {
		t.Errorf("status text without a listener:\n%s", text)
	}

	// The proxy listens: healthy, and the listener is counted.
	pod.Proxy(t, "proxy", netip.AddrPortFrom(netip.IPv4Unspecified(), 15006), "report", divertest.ProxyUID, divertest.ProxyUID)
	st, text = status()
	if st.Health != "healthy" || st.Listeners == nil || *st.Listeners != 1 {
		t.Errorf("with a listener: health %q, listeners %v", st.Health, st.Listeners)
	}
	if !strings.Contains(text, "health   healthy") || !strings.Contains(text, "1 proxy listener(s)") {
		t.Errorf("status text with a listener:\n%s", text)
	}

	// Inbound turned off: no inbound line pretends otherwise, no listener count.
	if _, err := runCLI(t, nil, "attach", "--pod-id", pod.Name, "--cgroup", pod.CgroupPath, "--netns", pod.NetNSPath, "--bpffs", opts.BPFFS, "--no-inbound"); err != nil {
		t.Fatal(err)
	}
	st, text = status()
	if st.Listeners != nil || st.Health != "healthy" || !strings.Contains(text, "inbound  off") || strings.Contains(text, "inbound  -> ") {
		t.Errorf("--no-inbound: health %q, listeners %v, text:\n%s", st.Health, st.Listeners, text)
	}
}

// --version names the release and the programs a binary attaches.
func TestVersion(t *testing.T) {
	out, err := runCLI(t, nil, "--version")
	if err != nil || strings.TrimSpace(out) != version.String() || !strings.Contains(out, version.Version) {
		t.Errorf("--version: %v %q, want %q", err, out, version.String())
	}
}
