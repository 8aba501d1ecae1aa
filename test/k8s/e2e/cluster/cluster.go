// Package cluster brings up and tears down a single-node Kubernetes cluster on this machine,
// offline: Kubernetes' own binaries built from the Go module proxy (see build.go), Debian's
// etcd, containerd, runc and CNI plugins, and images made without Docker (images.go).
//
// Everything the cluster writes lives under one state directory. The host changes it
// cannot avoid (sysctls the kubelet and the CNI bridge set, the bridge itself, pod cgroups,
// iptables rules, CNI's result cache) are recorded before the first process starts, in
// <state>/record.json, and undone by Down. Down stops only the processes Up started, by
// PID. When a run dies without Down (a crash, go test's timeout), the next Up finds the
// record and tears down what it describes first, so a run after a failed run still works.
package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Fixed parameters of the cluster. Ports are off the usual defaults so a development
// machine's own etcd or apiserver does not collide; the pod CIDR is a /24 on one bridge.
// The cluster is dual-stack, IPv4 first (every .status.podIP stays IPv4): pods get an
// IPv6 address too, from unique local ranges (fd00::/8) that do not overlap the host's
// own, and Services may have an IPv6 ClusterIP.
const (
	NodeName     = "divert-e2e"
	PodCIDR      = "10.244.0.0/24"
	PodGateway   = "10.244.0.1"
	ServiceCIDR  = "10.96.0.0/16"
	PodCIDR6     = "fd00:10:244::/64"
	PodGateway6  = "fd00:10:244::1"
	ServiceCIDR6 = "fd00:10:96::/112"
	Bridge       = "dvt-k8s0"
	CNINetwork   = "divert-e2e"
	APIPort      = 16443
	etcdClient   = 12379
	etcdPeer     = 12380
	lockFile     = "/run/lock/divert-k8s-e2e.lock"
	cniResults   = "/var/lib/cni/results"
	// The kubelet always links container logs into /var/log/containers (not configurable).
	containerLogLinks = "/var/log/containers"
)

// Config says where things go.
type Config struct {
	State string               // the one directory for all cluster state
	Logf  func(string, ...any) // progress and teardown notes
}

// Cluster is a running cluster.
type Cluster struct {
	State      string
	Kubeconfig string // admin (system:masters)
	NodeIP     string
	// BPFFS is a bpffs private to the cluster, mounted under State; pods mount it at
	// /sys/fs/bpf so divert's pins never touch the host's /sys/fs/bpf, and unmounting it at
	// teardown drops every pin the pods made.
	BPFFS string
	// ContainerdSock is the cluster containerd's socket (for ctr).
	ContainerdSock string
	// CNIBinDir and CNIConfDir are the directories containerd takes CNI plugins and the
	// network configuration from: the cluster's own, under State (the bin directory links
	// Debian's plugins from /usr/lib/cni), so a node agent installing a chained plugin
	// writes there and not into the host's /etc/cni or /usr/lib/cni.
	CNIBinDir, CNIConfDir string
	// NetNSDir is where pod network namespaces are mounted (containerd's
	// netns_mounts_under_state_dir), in place of /var/run/netns.
	NetNSDir string

	bins      Binaries
	proxyMode string // kube-proxy's mode now
	logf      func(string, ...any)
	rec       *record
	procs     map[string]*proc
	lock      *os.File
}

// record is what Down needs to undo a run, written before each change it describes.
type record struct {
	PIDs    map[string]int    `json:"pids"`
	Sysctls map[string]string `json:"sysctls"`
	// IPTables holds iptables-{nft,legacy}-save of the host before the run.
	IPTables map[string]string `json:"iptables"`
	// CNIResults lists libcni's result cache before the run (containerd 1.6 keeps it in
	// /var/lib/cni/results, outside its state directory).
	CNIResults []string `json:"cni_results"`
	// LogLinks lists /var/log/containers before the run.
	LogLinks []string `json:"log_links"`
	// Absent lists the hostDirs that did not exist before the run.
	Absent []string `json:"absent"`
	// NFTables lists the host's nftables tables before the run ("family name").
	NFTables []string `json:"nftables"`
}

// hostDirs are directories outside the state directory that the cluster's components may
// create and cannot be told not to: containerd 1.6's shims put their sockets in
// /run/containerd/s, libcni caches results in /var/lib/cni/results, the kubelet links
// container logs into /var/log/containers. Those that did not exist before are removed
// after the run if empty (deepest first).
var hostDirs = []string{"/run/containerd/s", "/run/containerd", cniResults, "/var/lib/cni", containerLogLinks}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

func (c *Cluster) path(p ...string) string { return filepath.Join(append([]string{c.State}, p...)...) }
func (c *Cluster) containerdSock() string  { return c.ContainerdSock }

func (c *Cluster) saveRecord() error {
	b, err := json.MarshalIndent(c.rec, "", "  ")
	if err != nil {
		return err
	}
	tmp := c.path("record.json.tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, c.path("record.json"))
}

// Up builds nothing: it takes the binaries (see Build) and starts the cluster, returning
// once the node is Ready and the default service account exists. On error, everything
// already started is torn down.
func Up(ctx context.Context, cfg Config, bins Binaries) (_ *Cluster, err error) {
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	state, err := filepath.Abs(cfg.State)
	if err != nil {
		return nil, err
	}
	c := &Cluster{
		State: state, bins: bins, logf: cfg.Logf, procs: map[string]*proc{},
		Kubeconfig:     filepath.Join(state, "admin.kubeconfig"),
		BPFFS:          filepath.Join(state, "bpffs"),
		ContainerdSock: filepath.Join(state, "containerd", "containerd.sock"),
		CNIBinDir:      filepath.Join(state, "cni", "bin"),
		CNIConfDir:     filepath.Join(state, "cni", "net.d"),
		NetNSDir:       filepath.Join(state, "containerd", "state", "io.containerd.grpc.v1.cri", "netns"),
	}
	// Descriptors this process inherited without close-on-exec (flock(1)'s lock on
	// /tmp/divert-e2e.lock) would be inherited by every component: after a crash that skips
	// Down, the left-over cluster would hold the caller's lock and the next run, which
	// would tear it down, could never take it. Best effort (Linux 5.11+).
	_ = unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if c.lock, err = takeLock(ctx, c.logf); err != nil {
		return nil, err
	}
	if err := c.recoverPrevious(); err != nil {
		c.unlock()
		return nil, fmt.Errorf("cleaning up an earlier run: %w", err)
	}
	if d := kubepodsDirs(); len(d) > 0 {
		c.unlock()
		return nil, fmt.Errorf("%s exists: another kubelet runs on this host (or one was left behind); stop it first", d[0])
	}
	if err := ensurePackages(c.logf); err != nil {
		c.unlock()
		return nil, err
	}
	if err := checkStateDir(state); err != nil {
		c.unlock()
		return nil, err
	}
	if err := os.RemoveAll(state); err != nil {
		c.unlock()
		return nil, err
	}
	if err := os.MkdirAll(c.path("logs"), 0o755); err != nil {
		c.unlock()
		return nil, err
	}

	// Record the host before touching it.
	c.rec = &record{PIDs: map[string]int{}, Sysctls: snapshotSysctls(), IPTables: map[string]string{}}
	for _, v := range iptablesVariants {
		if c.rec.IPTables[v], err = iptablesSave(v); err != nil {
			c.unlock()
			return nil, fmt.Errorf("iptables-%s-save: %w", v, err)
		}
	}
	if c.rec.NFTables, err = nftTables(); err != nil {
		c.unlock()
		return nil, err
	}
	c.rec.CNIResults = listDir(cniResults)
	c.rec.LogLinks = listDir(containerLogLinks)
	for _, d := range hostDirs {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			c.rec.Absent = append(c.rec.Absent, d)
		}
	}
	if err := c.saveRecord(); err != nil {
		c.unlock()
		return nil, err
	}
	defer func() {
		if err != nil {
			c.logf("bring-up failed: %v; tearing down", err)
			if derr := c.Down(); derr != nil {
				err = errors.Join(err, derr)
			}
		}
	}()

	if c.NodeIP, err = hostIP(); err != nil {
		return c, err
	}
	if err := c.mounts(); err != nil {
		return c, err
	}
	if err := serviceRoute(); err != nil {
		return c, err
	}
	if err := c.writeConfigs(); err != nil {
		return c, err
	}
	if err := c.startAll(ctx); err != nil {
		return c, err
	}
	return c, nil
}

// checkStateDir refuses to wipe a directory that is not an earlier run's state (a mistyped
// -k8s.state), or one that still has something mounted below it.
func checkStateDir(state string) error {
	if strings.Count(filepath.Clean(state), "/") < 2 {
		return fmt.Errorf("state directory %s: use a dedicated directory at least two levels deep", state)
	}
	if names := listDir(state); len(names) > 0 && !slices.Contains(names, "logs") && !slices.Contains(names, "record.json") {
		return fmt.Errorf("%s is not empty and is not an earlier run's state directory (no logs/ or record.json): not wiping it", state)
	}
	if pts, err := mountsUnder(state); err != nil || len(pts) > 0 {
		return fmt.Errorf("%s still has mounts (%v) and no record of them; unmount them first (%v)", state, pts, err)
	}
	return nil
}

// takeLock serialises runs on this host: clusters would share ports, the bridge and
// /sys/fs/cgroup/*/kubepods.
func takeLock(ctx context.Context, logf func(string, ...any)) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(lockFile), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(lockFile, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for waited := false; ; waited = true {
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err == nil {
			return f, nil
		} else if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, err
		}
		if !waited {
			logf("another e2e cluster holds %s; waiting", lockFile)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func (c *Cluster) unlock() {
	if c.lock != nil {
		c.lock.Close() // closing the fd releases the flock
		c.lock = nil
	}
}

// recoverPrevious tears down what an earlier run that never reached Down left behind.
func (c *Cluster) recoverPrevious() error {
	b, err := os.ReadFile(c.path("record.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	rec := &record{}
	if err := json.Unmarshal(b, rec); err != nil {
		return fmt.Errorf("%s: %w", c.path("record.json"), err)
	}
	c.logf("found %s from a run that did not finish; tearing it down first", c.path("record.json"))
	c.rec = rec
	return c.teardown()
}

// hostIP is the node's InternalIP, which the apiserver uses to reach the kubelet (exec,
// logs): the source address of the default route (a UDP "connect" sends nothing), else the
// first global IPv4 address of an interface that is up.
func hostIP() (string, error) {
	if conn, err := net.Dial("udp4", "203.0.113.1:9"); err == nil {
		defer conn.Close()
		return conn.LocalAddr().(*net.UDPAddr).IP.String(), nil
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return "", err
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 || ifc.Name == Bridge {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && ipn.IP.IsGlobalUnicast() {
				return ipn.IP.String(), nil
			}
		}
	}
	return "", errors.New("no IPv4 address for the node: no default route and no interface with a global address")
}

// mounts makes the state directory a shared mount (bind onto itself, rshared): / is a
// private mount on these machines, and the kubelet refuses hostPath and netns mounts below
// a private mount. The cluster's bpffs is mounted under it too.
func (c *Cluster) mounts() error {
	if err := unix.Mount(c.State, c.State, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind-mount %s: %w", c.State, err)
	}
	if err := unix.Mount("", c.State, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s rshared: %w", c.State, err)
	}
	if err := os.MkdirAll(c.BPFFS, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("bpf", c.BPFFS, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", c.BPFFS, err)
	}
	return nil
}

// start runs a component with its output in <state>/logs/<name>.log, in its own process
// group (a ^C on the terminal reaches only the test binary, which then tears down in
// order), and records its PID before anything else can fail.
func (c *Cluster) start(name, bin string, args ...string) error {
	logf, err := os.OpenFile(c.path("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.State
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	c.procs[name] = p
	c.rec.PIDs[name] = cmd.Process.Pid
	return c.saveRecord()
}

// running fails if a started component has already exited: a wait loop would otherwise
// only time out, without saying why.
func (c *Cluster) running(names ...string) error {
	for _, n := range names {
		if p, ok := c.procs[n]; ok {
			select {
			case <-p.done:
				return fmt.Errorf("%s exited: %s\n%s", n, p.cmd.ProcessState, c.LogTail(n, 25))
			default:
			}
		}
	}
	return nil
}

// LogTail returns the last lines of a component's log.
func (c *Cluster) LogTail(name string, lines int) string {
	b, _ := os.ReadFile(c.path("logs", name+".log"))
	return tail(b, lines)
}

// WaitFor polls fn until it succeeds, one of the watched components (all of them if none
// is named) dies, or the timeout passes.
func (c *Cluster) WaitFor(ctx context.Context, what string, timeout time.Duration, fn func() error, watch ...string) error {
	if len(watch) == 0 {
		for n := range c.procs {
			watch = append(watch, n)
		}
	}
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return nil
		}
		if rerr := c.running(watch...); rerr != nil {
			return fmt.Errorf("waiting for %s: %w", what, rerr)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (c *Cluster) httpsClient() (*http.Client, error) {
	pool := x509.NewCertPool()
	ca, err := os.ReadFile(c.path("pki", "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(c.path("pki", "admin.crt"), c.path("pki", "admin.key"))
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}, nil
}

func httpOK(cl *http.Client, url string) error {
	resp, err := cl.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

func (c *Cluster) startAll(ctx context.Context) error {
	if err := c.start("etcd", "/usr/bin/etcd",
		"--name", NodeName,
		"--data-dir", c.path("etcd"),
		"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdClient),
		"--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdClient),
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeer),
		"--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeer),
		"--initial-cluster", fmt.Sprintf("%s=http://127.0.0.1:%d", NodeName, etcdPeer),
		"--listen-metrics-urls", "",
	); err != nil {
		return err
	}
	if err := c.start("containerd", "/usr/bin/containerd", "--config", c.path("containerd", "config.toml")); err != nil {
		return err
	}
	plain := &http.Client{Timeout: 2 * time.Second}
	if err := c.WaitFor(ctx, "etcd", 30*time.Second, func() error {
		return httpOK(plain, fmt.Sprintf("http://127.0.0.1:%d/health", etcdClient))
	}, "etcd"); err != nil {
		return err
	}

	pki := c.path("pki")
	if err := c.start("kube-apiserver", c.bins.APIServer,
		"--etcd-servers", fmt.Sprintf("http://127.0.0.1:%d", etcdClient),
		"--bind-address", "0.0.0.0",
		"--secure-port", strconv.Itoa(APIPort),
		"--advertise-address", c.NodeIP,
		"--service-cluster-ip-range", ServiceCIDR+","+ServiceCIDR6,
		"--client-ca-file", filepath.Join(pki, "ca.crt"),
		"--tls-cert-file", filepath.Join(pki, "apiserver.crt"),
		"--tls-private-key-file", filepath.Join(pki, "apiserver.key"),
		"--kubelet-client-certificate", filepath.Join(pki, "apiserver-kubelet-client.crt"),
		"--kubelet-client-key", filepath.Join(pki, "apiserver-kubelet-client.key"),
		// The node's name (divert-e2e) resolves nowhere; reach the kubelet by address.
		"--kubelet-preferred-address-types", "InternalIP",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(pki, "sa.key"),
		"--authorization-mode", "Node,RBAC",
		"--enable-admission-plugins", "NodeRestriction",
		"--allow-privileged=true",
		"--cert-dir", filepath.Join(pki, "apiserver-generated"),
		"--profiling=false",
	); err != nil {
		return err
	}
	cl, err := c.httpsClient()
	if err != nil {
		return err
	}
	if err := c.WaitFor(ctx, "kube-apiserver /readyz", 90*time.Second, func() error {
		return httpOK(cl, fmt.Sprintf("https://127.0.0.1:%d/readyz", APIPort))
	}, "kube-apiserver", "etcd"); err != nil {
		return err
	}
	if err := c.start("kube-controller-manager", c.bins.ControllerManager,
		"--kubeconfig", c.path("controller-manager.kubeconfig"),
		"--leader-elect=false",
		"--secure-port=0",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file", filepath.Join(pki, "sa.key"),
		"--root-ca-file", filepath.Join(pki, "ca.crt"),
		"--cluster-name", NodeName,
		// Dual-stack as the apiserver; no --allocate-node-cidrs: host-local IPAM has the
		// ranges (configs.go), so the cluster CIDR only has to agree with them.
		"--service-cluster-ip-range", ServiceCIDR+","+ServiceCIDR6,
		"--cluster-cidr", PodCIDR+","+PodCIDR6,
		"--profiling=false",
	); err != nil {
		return err
	}
	if err := c.start("kube-scheduler", c.bins.Scheduler,
		"--kubeconfig", c.path("scheduler.kubeconfig"),
		"--leader-elect=false",
		"--secure-port=0",
		"--profiling=false",
	); err != nil {
		return err
	}
	if err := c.WaitFor(ctx, "containerd", 30*time.Second, func() error {
		return exec.Command("ctr", "--address", c.ContainerdSock, "version").Run()
	}, "containerd"); err != nil {
		return err
	}
	if err := c.start("kubelet", c.bins.Kubelet,
		"--config", c.path("kubelet", "config.yaml"),
		"--kubeconfig", c.path("kubelet.kubeconfig"),
		"--root-dir", c.path("kubelet", "root"),
		"--cert-dir", c.path("kubelet", "pki"),
		"--hostname-override", NodeName,
		"--node-ip", c.NodeIP,
	); err != nil {
		return err
	}
	all := []string{"etcd", "containerd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"}
	if err := c.WaitFor(ctx, "node Ready", 90*time.Second, func() error {
		out, err := c.Kubectl(ctx, "get", "node", NodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "True" {
			return fmt.Errorf("node Ready=%q", out)
		}
		return nil
	}, all...); err != nil {
		return err
	}
	// Pods can only be created once the service account controller made "default".
	if err := c.WaitFor(ctx, "service account default/default", 60*time.Second, func() error {
		_, err := c.Kubectl(ctx, "get", "serviceaccount", "default", "-n", "default")
		return err
	}, all...); err != nil {
		return err
	}
	// kube-proxy last: it reads the Node for its address. iptables mode first, as
	// kube-proxy's default; the tests switch it (SetProxyMode).
	return c.startProxy(ctx, ProxyIPTables)
}

// Kubectl runs kubectl as the cluster admin and returns its stdout; the error carries
// stderr.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	return c.KubectlIn(ctx, "", args...)
}

// KubectlIn is Kubectl with stdin.
func (c *Cluster) KubectlIn(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.bins.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// Down deletes every pod through the API (so the kubelet stops them and CNI releases
// their addresses), stops the components Up started, and undoes the host changes in the
// record. Logs stay in <state>/logs until the next run.
func (c *Cluster) Down() error {
	defer c.unlock()
	var errs []error
	if c.procs["kube-apiserver"] != nil && c.procs["kubelet"] != nil && c.running("kube-apiserver", "kubelet", "etcd") == nil {
		if err := c.deleteWorkloads(); err != nil {
			c.logf("deleting pods through the API: %v (continuing; containerd stops the rest)", err)
		}
	}
	errs = append(errs, c.teardown())
	return errors.Join(errs...)
}

// deleteWorkloads removes controllers first (a DaemonSet would recreate its pods), then
// every pod, and waits until the kubelet has stopped all sandboxes.
func (c *Cluster) deleteWorkloads() error {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if _, err := c.Kubectl(ctx, "delete", "daemonsets,deployments,replicasets,statefulsets,jobs", "--all", "--all-namespaces", "--wait=false"); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=true", "--timeout=60s"); err != nil {
		return err
	}
	// The API forgets a pod once the kubelet reports its containers gone; the sandbox
	// (and with it CNI DEL) follows within moments.
	return c.WaitFor(ctx, "pod sandboxes to stop", 30*time.Second, func() error {
		out, err := exec.Command("ctr", "--address", c.ContainerdSock, "-n", "k8s.io", "tasks", "ls", "-q").Output()
		if err != nil {
			return err
		}
		if n := len(strings.Fields(string(out))); n > 0 {
			return fmt.Errorf("%d tasks still running", n)
		}
		return nil
	})
}

// teardown stops processes and undoes host changes as c.rec describes; it works both for
// this run and for a record left by an earlier one.
func (c *Cluster) teardown() error {
	if c.rec == nil {
		return nil
	}
	var errs []error
	last := time.Now()
	add := func(err error) {
		if err != nil {
			c.logf("teardown: %v", err)
			errs = append(errs, err)
		}
		if d := time.Since(last); d > 2*time.Second {
			c.logf("teardown: a step took %v", d.Round(100*time.Millisecond))
		}
		last = time.Now()
	}
	// The kubelet first, so it does not restart what is being stopped underneath it.
	for _, n := range []string{"kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler"} {
		add(c.stop(n))
	}
	// Normally no pod is left (Down deleted them through the API). After a crash, or if
	// that failed, kill what runs in the pod cgroups: quicker and surer than asking
	// containerd task by task; its state is thrown away with the state directory.
	add(killKubepods(c.logf))
	add(c.stop("containerd"))
	add(c.killShims())
	for _, n := range []string{"kube-apiserver", "etcd"} {
		add(c.stop(n))
	}
	add(removeKubepods(c.logf))
	add(unmountAll(c.State))
	add(deleteLink(Bridge))
	add(c.cleanupProxy())
	add(restoreIptables(c.rec.IPTables, []string{PodCIDR, PodCIDR6, Bridge}, c.logf))
	add(restoreNFTables(c.rec.NFTables, c.logf))
	add(restoreSysctls(c.rec.Sysctls, c.logf))
	// Files the run left outside the state directory.
	for _, f := range listDir(cniResults) {
		if !slices.Contains(c.rec.CNIResults, f) && (strings.HasPrefix(f, CNINetwork+"-") || strings.HasPrefix(f, "cni-loopback-")) {
			add(os.Remove(filepath.Join(cniResults, f)))
		}
	}
	for _, f := range listDir(containerLogLinks) {
		if !slices.Contains(c.rec.LogLinks, f) {
			if target, err := os.Readlink(filepath.Join(containerLogLinks, f)); err == nil && strings.HasPrefix(target, c.State+"/") {
				add(os.Remove(filepath.Join(containerLogLinks, f)))
			}
		}
	}
	for _, d := range hostDirs {
		if slices.Contains(c.rec.Absent, d) {
			_ = os.Remove(d) // only if empty: anything else in it is not ours to remove
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// Keep the logs for a look after the run; everything else goes.
	for _, e := range listDir(c.State) {
		if e != "logs" {
			add(os.RemoveAll(c.path(e)))
		}
	}
	c.rec = nil
	return errors.Join(errs...)
}

// stop ends one recorded component: SIGTERM, then SIGKILL after 15 s. A PID from an
// earlier run is only signalled if its command line still names this state directory
// (the PID may have been reused since).
func (c *Cluster) stop(name string) error {
	pid, ok := c.rec.PIDs[name]
	if !ok {
		return nil
	}
	defer func() { delete(c.rec.PIDs, name); _ = c.saveRecord() }()
	if p, ok := c.procs[name]; ok {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			c.logf("%s did not stop in 15s; killing", name)
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		return nil
	}
	if !c.ownsPID(pid) {
		return nil
	}
	c.logf("stopping %s (pid %d) left by an earlier run", name, pid)
	killWait(pid, 5*time.Second)
	return nil
}

func (c *Cluster) ownsPID(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), c.State)
}

// killWait sends SIGTERM, and SIGKILL if the process is still there after grace.
func killWait(pid int, grace time.Duration) {
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for deadline := time.Now().Add(grace); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if syscall.Kill(pid, 0) != nil {
			return
		}
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	time.Sleep(100 * time.Millisecond)
}

// killShims ends containerd-shim processes serving this cluster's containerd, found by the
// -address argument naming its socket; they outlive containerd by design.
func (c *Cluster) killShims() error {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		for i, a := range args {
			if a == "-address" && i+1 < len(args) && args[i+1] == c.ContainerdSock {
				pid, _ := strconv.Atoi(strings.Split(p, "/")[2])
				c.logf("stopping leftover shim pid %d", pid)
				_ = syscall.Kill(pid, syscall.SIGKILL) // they ignore SIGTERM while containerd is gone
			}
		}
	}
	return nil
}
