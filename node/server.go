package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node/cniapi"
)

// Serve answers the CNI plugin on a unix socket only root can use, until ctx ends.
func (a *Agent) Serve(ctx context.Context, socket string) error {
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return err
	}
	os.Remove(socket) // a stale socket from a previous agent
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cniapi.Path, func(w http.ResponseWriter, r *http.Request) {
		var req Request
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var resp Response
		switch req.Command {
		case "ADD":
			resp, err = a.Add(r.Context(), req)
		case "DEL":
			resp, err = a.Del(r.Context(), req)
		default:
			err = fmt.Errorf("unknown command %q", req.Command)
		}
		if err != nil {
			resp.Error = err.Error()
			a.log().Error("cni "+req.Command, "pod", req.PodNamespace+"/"+req.PodName, "err", err)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(resp)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err = srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
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

// WriteMetrics writes the metrics of every attached pod.
func (a *Agent) WriteMetrics(w io.Writer) {
	ids, _ := loader.List(a.Loader)
	names := a.PodNames()
	fmt.Fprintln(w, "# HELP divert_pods_attached Pods with divert attached on this node.")
	fmt.Fprintln(w, "# TYPE divert_pods_attached gauge")
	fmt.Fprintf(w, "divert_pods_attached %d\n", len(ids))
	fmt.Fprintln(w, "# HELP divert_verdicts_total Connections decided by divert, by pod and the rule that decided.")
	fmt.Fprintln(w, "# TYPE divert_verdicts_total counter")
	var drops []string
	for _, id := range ids {
		st, err := loader.Status(id, a.Loader)
		if err != nil {
			continue
		}
		ns, name, _ := strings.Cut(names[id], "/")
		labels := fmt.Sprintf(`pod_uid=%q,namespace=%q,pod=%q`, id, ns, name)
		reasons := make([]string, 0, len(st.Counters))
		for r := range st.Counters {
			reasons = append(reasons, r)
		}
		slices.Sort(reasons)
		for _, r := range reasons {
			fmt.Fprintf(w, "divert_verdicts_total{%s,reason=%q} %d\n", labels, r, st.Counters[r])
		}
		kinds := make([]string, 0, len(st.Drops))
		for d := range st.Drops {
			kinds = append(kinds, d)
		}
		slices.Sort(kinds)
		for _, d := range kinds {
			drops = append(drops, fmt.Sprintf("divert_drops_total{%s,drop=%q} %d", labels, d, st.Drops[d]))
		}
	}
	fmt.Fprintln(w, "# HELP divert_drops_total What divert's programs gave up on, by pod and kind: connections refused, original destinations not delivered.")
	fmt.Fprintln(w, "# TYPE divert_drops_total counter")
	for _, d := range drops {
		fmt.Fprintln(w, d)
	}
	// Pods whose init container fell back to iptables are visible here, not only in its log.
	fallbacks, _ := loader.Fallbacks(a.Loader)
	fmt.Fprintln(w, "# HELP divert_iptables_fallback Pods captured by istio's iptables rules because eBPF was not possible here; the reason is a label.")
	fmt.Fprintln(w, "# TYPE divert_iptables_fallback gauge")
	for _, id := range slices.Sorted(maps.Keys(fallbacks)) {
		ns, name, _ := strings.Cut(names[id], "/")
		fmt.Fprintf(w, "divert_iptables_fallback{pod_uid=%q,namespace=%q,pod=%q,reason=%q} 1\n", id, ns, name, fallbacks[id])
	}
}
