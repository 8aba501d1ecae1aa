package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node/cniapi"
	"github.com/meshdivert/divert/policy"
)

// Agent attaches divert to the selected pods of one node.
type Agent struct {
	// Client reads pods; the agent needs get and list on pods, nothing else.
	Client kubernetes.Interface
	// NodeName limits reconcile to this node's pods.
	NodeName string
	// CgroupRoot is the cgroup2 mount (as the agent sees the host's).
	CgroupRoot string
	// Loader says where pins live.
	Loader loader.Options
	// Defaults is the policy before a pod's annotations (Istio's injector values).
	Defaults policy.Config
	// Log receives one line per decision; warnings name the pod.
	Log *slog.Logger
	// ExcludeNamespaces are never captured (the plugin does not even ask for them).
	ExcludeNamespaces []string
	// KeepIstioIptables leaves istio's iptables rules in the netns of a pod the agent
	// captures (by default they are removed once it does: see takeOverIptables).
	KeepIstioIptables bool

	mu              sync.Mutex
	pods            map[string]podRef // attached pods by UID, for metrics and logs
	live            map[string]podRef // the node's pods at the last reconcile, by UID: names for metrics
	errors          map[string]uint64 // failed operations (metrics.go)
	iptablesChecked map[string]bool   // pods whose netns was rid of istio's rules, by UID
}

type podRef struct{ Namespace, Name string }

// Request and Response are the plugin protocol (package cniapi, kept free of Kubernetes
// libraries so the plugin binary stays small).
type (
	Request  = cniapi.Request
	Response = cniapi.Response
)

// Add captures the pod if it is selected. An error means the pod must not start: it was
// selected, and capture could not be put in place.
func (a *Agent) Add(ctx context.Context, req Request) (Response, error) {
	pod, err := a.Client.CoreV1().Pods(req.PodNamespace).Get(ctx, req.PodName, metav1.GetOptions{})
	if err != nil {
		a.countError(opAttach)
		return Response{}, fmt.Errorf("get pod %s/%s: %w", req.PodNamespace, req.PodName, err)
	}
	if req.PodUID != "" && string(pod.UID) != req.PodUID {
		a.countError(opAttach)
		return Response{}, fmt.Errorf("pod %s/%s has uid %s, CNI asked for %s", req.PodNamespace, req.PodName, pod.UID, req.PodUID)
	}
	selected, why := a.selected(pod)
	if !selected {
		a.log().Info("not capturing", "pod", key(pod), "reason", why)
		return Response{Reason: why}, nil
	}
	if err := a.attach(ctx, pod, req.IPs, hostPath(req.Netns), true); err != nil {
		return Response{}, err
	}
	a.forgetIptablesCheck(string(pod.UID))
	return Response{Captured: true, Reason: why}, nil
}

// Del removes capture for the pod (whether or not it had any). It never fails for a pod
// that is not attached: CNI DEL must be idempotent.
func (a *Agent) Del(ctx context.Context, req Request) (Response, error) {
	if req.PodUID == "" {
		return Response{Reason: "no pod uid"}, nil
	}
	return Response{Reason: "detached"}, a.detach(req.PodUID)
}

// attach captures a selected pod. cniIPs are the pod's addresses from the CNI result (at
// ADD, before the API has them); the pod's status adds what the API knows. A failure is
// counted as an update if the pod had pins, else as an attach.
func (a *Agent) attach(ctx context.Context, pod *corev1.Pod, cniIPs []string, netns string, create bool) (err error) {
	op := opAttach
	if _, statErr := os.Stat(loader.PinDir(a.Loader, string(pod.UID))); statErr == nil {
		op = opUpdate
	}
	defer func() {
		if err != nil {
			a.countError(op)
		}
	}()
	cfg, warnings, err := Config(pod, a.Defaults)
	for _, w := range warnings {
		a.log().Warn(w, "pod", key(pod))
	}
	if err != nil {
		return err
	}
	decideFamilies(pod, &cfg, cniIPs)
	cg, err := a.podCgroup(pod, create)
	if err != nil {
		return err
	}
	id := string(pod.UID)
	if err := loader.Attach(ctx, loader.Pod{ID: id, Cgroup: cg, NetNS: netns, Name: pod.Namespace + "/" + pod.Name}, &cfg, a.Loader); err != nil {
		return fmt.Errorf("attach pod %s: %w", key(pod), err)
	}
	a.mu.Lock()
	if a.pods == nil {
		a.pods = map[string]podRef{}
	}
	a.pods[id] = podRef{pod.Namespace, pod.Name}
	a.mu.Unlock()
	a.log().Info("captured", "pod", key(pod), "uid", id, "cgroup", cg)
	if cfg.DropInvalid {
		a.log().Info(loader.DropInvalidNote, "pod", key(pod))
	}
	return nil
}

func (a *Agent) detach(uid string) error {
	err := loader.Detach(uid, a.Loader)
	a.mu.Lock()
	ref, known := a.pods[uid]
	delete(a.pods, uid)
	delete(a.iptablesChecked, uid)
	a.mu.Unlock()
	if errors.Is(err, loader.ErrNotAttached) {
		return nil
	}
	if err != nil {
		a.countError(opDetach)
		return err
	}
	a.log().Info("released", "pod", ref.Namespace+"/"+ref.Name, "uid", uid, "known", known)
	return nil
}

// decideFamilies decides, as istio-cni would, whether the pod's IPv6 connections are
// captured too (policy.Config.DecideIPv6): from its addresses (the CNI result's at ADD,
// before the API has them, and the API's) and dual stack (ISTIO_DUAL_STACK, Config).
func decideFamilies(pod *corev1.Pod, cfg *policy.Config, cniIPs []string) {
	ips := slices.Clone(cniIPs)
	for _, ip := range pod.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	var addrs []netip.Addr
	for _, s := range ips {
		if a, err := netip.ParseAddr(s); err == nil {
			addrs = append(addrs, a)
		}
	}
	cfg.DecideIPv6(addrs)
}

// podCgroup finds the pod's cgroup v2 directory. At CNI ADD the first container may not
// have made it yet (runc creates the v2 mirror of a cgroupfs-driver pod with its first
// container); the agent then creates it where runc will, so the programs are in place
// before any container of the pod runs.
func (a *Agent) podCgroup(pod *corev1.Pod, create bool) (string, error) {
	rel, err := FindPodCgroup(os.DirFS(a.CgroupRoot), string(pod.UID))
	if err == nil {
		return filepath.Join(a.CgroupRoot, rel), nil
	}
	if !errors.Is(err, ErrNoCgroup) || !create {
		return "", err
	}
	dir := filepath.Join(a.CgroupRoot, ExpectedPodCgroup(pod))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup for pod %s: %w", key(pod), err)
	}
	return dir, nil
}

// Reconcile makes the pins match the live pods of this node: selected pods without
// capture get it (pods created while the agent was down), pins of pods that are gone are
// removed. With refresh, attached pods are attached again, which updates their policy
// and swaps in this build's programs (link.Update: no gap in capture) — done on start.
//
// Pins of a pod that still runs are never removed, selected or not: an unselected pod with
// pins was captured by someone else (istio-init running divert in the pod, while a mesh
// migrates to node mode), and taking its capture away would let its traffic escape. A
// selected pod still holding istio's iptables rules (captured by istio-init) has them
// removed once divert captures it (takeOverIptables).
func (a *Agent) Reconcile(ctx context.Context, refresh bool) error {
	list, err := a.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", a.NodeName).String(),
	})
	if err != nil {
		a.countError(opReconcile)
		return fmt.Errorf("list pods on node %s: %w", a.NodeName, err)
	}
	attached, err := loader.List(a.Loader)
	if err != nil {
		a.countError(opReconcile)
		return err
	}
	isAttached := map[string]bool{}
	for _, id := range attached {
		isAttached[id] = true
	}
	live := map[string]bool{}
	names := map[string]podRef{}
	defer func() {
		a.mu.Lock()
		a.live = names
		a.mu.Unlock()
	}()
	var errs []error
	for i := range list.Items {
		pod := &list.Items[i]
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		id := string(pod.UID)
		live[id] = true
		names[id] = podRef{pod.Namespace, pod.Name}
		if ok, _ := a.selected(pod); !ok {
			continue
		}
		if isAttached[id] && !refresh {
			// An inert pod's attach was killed midway (an agent killed during CNI ADD):
			// attaching again finishes it.
			if inert, err := loader.Inert(id, a.Loader); err == nil && !inert {
				if err := a.takeOverIptables(ctx, pod, ""); err != nil {
					errs = append(errs, err)
				}
				continue
			}
		}
		netns, err := a.podNetns(pod)
		if errors.Is(err, ErrNoCgroup) || errors.Is(err, errNoProcess) {
			continue // not running yet: CNI ADD will come
		}
		if err == nil {
			err = a.attach(ctx, pod, nil, netns, false) // counts its own failure
		} else if isAttached[id] {
			a.countError(opUpdate)
		} else {
			a.countError(opAttach)
		}
		if err == nil {
			err = a.takeOverIptables(ctx, pod, netns)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	for _, id := range attached {
		if !live[id] && !a.heldElsewhere(id) {
			if err := a.detach(id); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// Fallback markers of init containers (their pods captured by iptables) go with the pod.
	fallbacks, err := loader.Fallbacks(a.Loader)
	if err != nil {
		a.countError(opReconcile)
		errs = append(errs, err)
	}
	for id := range fallbacks {
		if !live[id] {
			if err := loader.ClearFallback(id, a.Loader); err != nil {
				a.countError(opReconcile)
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// heldElsewhere reports whether pins under id, which no pod on this node has as its UID,
// may still capture a running pod: an id that is not a UID was chosen by someone else
// (istio-init running divert with --pod-id or DIVERT_POD_ID), and the agent cannot tell
// its pod from the API. Only the kernel can: once the pod's cgroup or netns is gone, its
// links are defunct and the pins are stale. Pins under a UID are the pod's own; that pod
// is gone from the API, and they go.
func (a *Agent) heldElsewhere(id string) bool {
	if podUID.MatchString(id) {
		return false
	}
	gone, err := loader.Defunct(id, a.Loader)
	return err == nil && len(gone) == 0
}

// podUID is the shape of a Kubernetes UID (RFC 4122, as the apiserver writes it).
var podUID = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

var errNoProcess = errors.New("no process in the pod's cgroup")

// podNetns finds the pod's network namespace through a process of the pod (the sandbox).
func (a *Agent) podNetns(pod *corev1.Pod) (string, error) {
	cg, err := a.podCgroup(pod, false)
	if err != nil {
		return "", err
	}
	var pid int
	err = filepath.WalkDir(cg, func(p string, d fs.DirEntry, err error) error {
		if err != nil || pid != 0 || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		if f := strings.Fields(string(b)); len(f) > 0 {
			pid, _ = strconv.Atoi(f[0])
		}
		return nil
	})
	if err != nil || pid == 0 {
		return "", fmt.Errorf("pod %s: %w", key(pod), errNoProcess)
	}
	return fmt.Sprintf("/proc/%d/ns/net", pid), nil
}

// selected is Selected, with the agent's excluded namespaces left out.
func (a *Agent) selected(pod *corev1.Pod) (bool, string) {
	if slices.Contains(a.ExcludeNamespaces, pod.Namespace) {
		return false, "namespace " + pod.Namespace + " is excluded"
	}
	return Selected(pod)
}

func (a *Agent) log() *slog.Logger {
	if a.Log == nil {
		return slog.Default()
	}
	return a.Log
}

// hostPath makes a path the runtime gave (as the host sees it) usable from the agent's
// container: with hostPID, /proc/1/root is the host's root in the host's mount namespace,
// so a netns bind-mounted anywhere on the host is reachable without mounting its directory.
func hostPath(p string) string {
	if _, err := os.Stat(p); err == nil || p == "" {
		return p
	}
	if alt := filepath.Join("/proc/1/root", p); alt != p {
		if _, err := os.Stat(alt); err == nil {
			return alt
		}
	}
	return p
}

func key(pod *corev1.Pod) string { return pod.Namespace + "/" + pod.Name }

// IsNotFound reports whether err is the API's not-found.
func IsNotFound(err error) bool { return apierrors.IsNotFound(err) }
