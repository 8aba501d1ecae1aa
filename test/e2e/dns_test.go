package e2e

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

// Names the test resolves: one only the agent knows (its answer proves the query went
// through the agent), one only the upstream nameserver knows (the agent forwards it, as
// its own uid, which DNS capture must leave alone).
const (
	agentName    = "agent-only.divert.test"
	agentAddr    = "10.9.9.9"
	upstreamName = "upstream-only.divert.test"
	upstreamAddr = "10.1.2.3"
)

// startDNSMasq runs dnsmasq (Debian's, unmodified) with args and waits until it serves.
func startDNSMasq(t *testing.T, start func(testpod.ProcSpec) *testpod.Proc, uid uint32, args ...string) {
	t.Helper()
	bin, err := exec.LookPath("dnsmasq")
	if err != nil {
		t.Fatalf("dnsmasq is required (make deps installs dnsmasq-base): %v", err)
	}
	base := []string{"--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", "--no-resolv", "--no-hosts",
		"--bind-interfaces", "--log-facility=-", "--cache-size=0"}
	if uid == 0 {
		base = append(base, "--user=root")
	}
	p := start(testpod.ProcSpec{UID: uid, GID: uid, Path: bin, Args: append(base, args...)})
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if strings.Contains(p.Stderr(), "started, version") {
			return
		}
		if e := p.Exited(); e != "" {
			t.Fatalf("dnsmasq %v: %s\n%s", args, e, p.Stderr())
		}
	}
	t.Fatalf("dnsmasq %v did not start:\n%s", args, p.Stderr())
}

// Real resolvers in a pod, unmodified — glibc (getent hosts, reading the pod's resolv.conf),
// dig (UDP and TCP) and Go's pure resolver — get their answers from the agent (dnsmasq as
// uid 1337 on 127.0.0.1:15053, forwarding to the real nameserver) with DNS capture on, as
// from the nameserver itself: each checks the answer's source, so a reply from 127.0.0.1
// would be dropped. Without capture, only the nameserver answers.
func TestRealResolvers(t *testing.T) {
	for _, tool := range []string{"dig", "getent", "unshare", "setpriv", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required (make deps): %v", tool, err)
		}
	}
	pod := testpod.New(t)
	ns := pod.Net.Addrs[3]
	startDNSMasq(t, func(s testpod.ProcSpec) *testpod.Proc { return pod.Net.Start(t, s) }, 0,
		"--port=53", "--listen-address="+ns.String(), "--host-record="+upstreamName+","+upstreamAddr)
	startDNSMasq(t, func(s testpod.ProcSpec) *testpod.Proc { return pod.Start(t, s) }, proxyUID,
		"--port=15053", "--listen-address=127.0.0.1", "--server="+ns.String(), "--address=/"+agentName+"/"+agentAddr)

	resolvConf := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(resolvConf, []byte("nameserver "+ns.String()+"\noptions timeout:2 attempts:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(resolvConf), 0o755); err != nil {
		t.Fatal(err)
	}
	// run runs a resolver in the pod as the app; getent gets the pod's resolv.conf through a
	// private mount namespace.
	run := func(t *testing.T, tool string, args ...string) string {
		t.Helper()
		spec := testpod.ProcSpec{UID: appUID, GID: appUID}
		switch tool {
		case "getent":
			spec = testpod.ProcSpec{Path: "/usr/bin/unshare", Args: []string{"-m", "/bin/sh", "-c",
				"PATH=/usr/sbin:/usr/bin:/sbin:/bin; mount --bind " + resolvConf + " /etc/resolv.conf && " +
					"exec setpriv --reuid=1000 --regid=1000 --clear-groups getent ahostsv4 " + args[0] + " | awk '{print $1; exit}'"}}
		case "dig":
			spec.Path, spec.Args = "/usr/bin/dig", append([]string{"+short", "+tries=1", "+time=2", "@" + ns.String()}, args...)
		}
		return strings.TrimSpace(pod.Start(t, spec).Wait(t, 15*time.Second))
	}
	resolve := func(t *testing.T, name string) map[string]string {
		nsPort := netip.AddrPortFrom(ns, 53)
		return map[string]string{
			"getent":   run(t, "getent", name),
			"dig":      run(t, "dig", name),
			"dig +tcp": run(t, "dig", "+tcp", name),
			"go (udp)": pod.GoResolve(t, appUID, appUID, name, nsPort, false),
			"go (tcp)": pod.GoResolve(t, appUID, appUID, name, nsPort, true),
		}
	}
	expect := func(t *testing.T, name, want string) {
		t.Helper()
		got := resolve(t, name)
		t.Logf("%s: %v", name, got)
		for tool, got := range got {
			if (want == "" && (got == agentAddr || got == upstreamAddr)) || (want != "" && got != want) {
				t.Errorf("%s %s: got %q, want %q", tool, name, got, want)
			}
		}
	}

	cfg := divertest.Config(t, "--redirect-dns", "--dns-servers", ns.String())
	t.Run("no capture", func(t *testing.T) {
		expect(t, upstreamName, upstreamAddr)
		expect(t, agentName, "") // the nameserver does not know it
	})
	t.Run("ebpf", func(t *testing.T) {
		opts := divertest.BPFFS(t)
		divertest.Attach(t, pod, opts, cfg)
		expect(t, agentName, agentAddr)
		expect(t, upstreamName, upstreamAddr)
	})
	for _, b := range divertest.IPTablesBackends {
		t.Run("iptables-"+b.String(), func(t *testing.T) {
			divertest.ApplyIPTables(t, pod, b, cfg)
			expect(t, agentName, agentAddr)
			expect(t, upstreamName, upstreamAddr)
		})
	}
}
