package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/meshdivert/divert/loader"
)

// The agent's operations whose failures divert_agent_errors_total counts, by its
// operation label.
const (
	opAttach    = "attach"    // a pod without capture (CNI ADD, or reconcile): at ADD the pod does not start
	opUpdate    = "update"    // a pod already attached (reconcile's refresh on start, an inert pod's repair)
	opDetach    = "detach"    // CNI DEL, or reconcile removing the pins of a pod that is gone
	opReconcile = "reconcile" // listing the node's pods, the pins or the fallback markers
	// removing istio-init's iptables rules from a captured pod (migrate.go): both stay
	opRemoveIptables = "remove-istio-iptables"
)

var errorOps = []string{opAttach, opUpdate, opDetach, opReconcile, opRemoveIptables}

func (a *Agent) countError(op string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.errors == nil {
		a.errors = map[string]uint64{}
	}
	a.errors[op]++
}

// ServeMetrics exports the per-pod verdict counters in Prometheus' text format.
func (a *Agent) ServeMetrics(ctx context.Context, addr string) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		a.WriteMetrics(w)
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err := srv.ListenAndServe()
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// podName names an attached pod (namespace/name) for its labels, whoever attached it: the
// agent's own record of the pods it attached, else the name the attacher kept beside the
// pins (an init container given $POD_NAMESPACE/$POD_NAME), else the pod the API lists on
// this node under that UID (istio-init from Istio's own template knows no name). "" when
// none knows it (an id that is no pod's UID).
func (a *Agent) podName(id, pinned string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r, ok := a.pods[id]; ok {
		return r.Namespace + "/" + r.Name
	}
	if pinned != "" {
		return pinned
	}
	if r, ok := a.live[id]; ok {
		return r.Namespace + "/" + r.Name
	}
	return ""
}

func (a *Agent) podLabels(id, pinned string) string {
	ns, name, _ := strings.Cut(a.podName(id, pinned), "/")
	return fmt.Sprintf(`pod_uid=%q,namespace=%q,pod=%q`, id, ns, name)
}

// WriteMetrics writes the metrics of every pod attached on this node (by the agent or by
// an init container: both leave their pins in the same bpffs) and of the agent itself.
func (a *Agent) WriteMetrics(w io.Writer) {
	ids, _ := loader.List(a.Loader)
	fmt.Fprintln(w, "# HELP divert_pods_attached Pods with divert attached on this node.")
	fmt.Fprintln(w, "# TYPE divert_pods_attached gauge")
	fmt.Fprintf(w, "divert_pods_attached %d\n", len(ids))
	fmt.Fprintln(w, "# HELP divert_verdicts_total Connections decided by divert's programs, by pod and the rule that decided (reason): TCP per connect, DNS over UDP per query.")
	fmt.Fprintln(w, "# TYPE divert_verdicts_total counter")
	var drops, health []string
	for _, id := range ids {
		st, err := loader.Status(id, a.Loader)
		if err != nil {
			continue // detached meanwhile
		}
		labels := a.podLabels(id, st.Pod)
		for _, r := range slices.Sorted(maps.Keys(st.Counters)) {
			fmt.Fprintf(w, "divert_verdicts_total{%s,reason=%q} %d\n", labels, r, st.Counters[r])
		}
		for _, d := range slices.Sorted(maps.Keys(st.Drops)) {
			drops = append(drops, fmt.Sprintf("divert_drops_total{%s,reason=%q} %d", labels, d, st.Drops[d]))
		}
		healthy := 0
		if st.Health == "healthy" {
			healthy = 1
		}
		health = append(health, fmt.Sprintf("divert_pod_healthy{%s,health=%q} %d", labels, st.Health, healthy))
	}
	fmt.Fprintln(w, "# HELP divert_pod_healthy 1 when divert status calls the pod healthy, else 0; the health label is status' line (the reason and the fix).")
	fmt.Fprintln(w, "# TYPE divert_pod_healthy gauge")
	for _, h := range health {
		fmt.Fprintln(w, h)
	}
	fmt.Fprintln(w, "# HELP divert_drops_total What divert's programs gave up on, by pod and reason: connections refused, original destinations not delivered.")
	fmt.Fprintln(w, "# TYPE divert_drops_total counter")
	for _, d := range drops {
		fmt.Fprintln(w, d)
	}
	// Pods whose init container fell back to iptables are visible here, not only in its log.
	fallbacks, _ := loader.Fallbacks(a.Loader)
	fmt.Fprintln(w, "# HELP divert_iptables_fallback Pods captured by istio's iptables rules because eBPF was not possible here; the reason is a label.")
	fmt.Fprintln(w, "# TYPE divert_iptables_fallback gauge")
	for _, id := range slices.Sorted(maps.Keys(fallbacks)) {
		fmt.Fprintf(w, "divert_iptables_fallback{%s,reason=%q} 1\n", a.podLabels(id, ""), fallbacks[id])
	}
	a.mu.Lock()
	errs := maps.Clone(a.errors)
	a.mu.Unlock()
	fmt.Fprintln(w, "# HELP divert_agent_errors_total Operations of this node agent that failed, by operation: attach (a pod without capture; at CNI ADD the pod does not start), update (re-attaching an attached pod), detach, reconcile (listing pods, pins or markers), remove-istio-iptables (taking istio-init's rules out of a captured pod; they stay, and capture too). The agent's log says which pod and why.")
	fmt.Fprintln(w, "# TYPE divert_agent_errors_total counter")
	for _, op := range errorOps {
		fmt.Fprintf(w, "divert_agent_errors_total{operation=%q} %d\n", op, errs[op])
	}
}
