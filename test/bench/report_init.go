package bench

import (
	"fmt"
	"strings"
)

// B5's init-container rows (b5init_test.go): the whole `divert istio-iptables` process per pod.
const (
	B5Init   = "B5-init"
	InitWall = "init run ms"
	InitCPU  = "init run CPU ms"
)

var initModes = []Mode{EBPF, EBPFReused, NFT, Legacy}

// initRunSection is B5's table of the init container's whole run, or "" if none was measured.
func initRunSection(res *Results) string {
	if len(res.Values(B5Init, InitWall, res.Params.B5Pods[0], EBPF)) == 0 {
		return ""
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("The init container's whole run: the image's `divert` binary (built as the Dockerfile builds it) run\n")
	w("as `divert istio-iptables` with the sidecar injector's flags and `--mode ebpf`, or `--mode iptables\n")
	w("--iptables-backend nft` (or `legacy`: istio's exact rules through iptables-restore, what istio-iptables\n")
	w("does), as root in the pod's netns, born in a fresh container cgroup below the pod's cgroup (kubelet's\n")
	w("cgroupfs layout), with a mount table of its own without the pods' netns mounts (as a container's own),\n")
	w("and timed from just before the fork to the reaping; CPU is what wait4 reports for the\n")
	w("process and the iptables tools it ran. One pass per mode over the same pods, pod k starting with k−1\n")
	w("captured; the captures are then removed as above. The eBPF pass has a bpffs of its own: its first run\n")
	w("finds no programs pinned and loads the node's (probe, then attach), the later runs find them pinned.\n")
	w("Each of its pods takes a new slot (every eighth fills eight slots with maps, and each loads its slot's\n")
	w("sk_lookup). `ebpf-reused` is a second eBPF pass over the same pods once the first pass's are gone: each\n")
	w("pod takes a slot an earlier pod left, whose maps and sk_lookup are kept (pods coming and going, as on a\n")
	w("node that has run a while). Ratios are taken pod by pod. Milliseconds.\n\n")
	w("| pods | k-th pod | ebpf | ebpf-reused | iptables-nft | iptables-legacy | ebpf / nft | reused / nft | ebpf CPU | reused CPU | nft CPU | legacy CPU | ebpf / nft CPU | reused / nft CPU |\n")
	w("|---:|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	from := 1
	for _, k := range res.Params.B5Pods {
		kth := fmt.Sprintf("%d–%d", from, k)
		if from == k {
			kth = fmt.Sprint(k)
		}
		w("| %d | %s |", k, kth)
		for _, m := range initModes {
			w(" %s |", Summarize(res.Values(B5Init, InitWall, k, m)))
		}
		w(" %s | %s |", res.Ratio(B5Init, InitWall, k, EBPF, NFT).RatioString(), res.Ratio(B5Init, InitWall, k, EBPFReused, NFT).RatioString())
		for _, m := range initModes {
			w(" %s |", Summarize(res.Values(B5Init, InitCPU, k, m)))
		}
		w(" %s | %s |\n", res.Ratio(B5Init, InitCPU, k, EBPF, NFT).RatioString(), res.Ratio(B5Init, InitCPU, k, EBPFReused, NFT).RatioString())
		from = k + 1
	}
	w("\n")
	return b.String()
}

// initRunSummary is the summary's line on the init container's whole run: the first pod and
// the last group.
func initRunSummary(res *Results) []string {
	ks := res.Params.B5Pods
	if len(ks) < 2 || len(res.Values(B5Init, InitWall, ks[0], EBPF)) == 0 {
		return nil
	}
	last, from := ks[len(ks)-1], ks[len(ks)-2]+1
	part := func(k int) string {
		var ps []string
		for _, m := range initModes {
			ps = append(ps, fmt.Sprintf("%s %s ms (CPU %s)", m, Summarize(res.Values(B5Init, InitWall, k, m)), Summarize(res.Values(B5Init, InitCPU, k, m))))
		}
		return strings.Join(ps, ", ") + fmt.Sprintf(", ebpf/nft %s (CPU %s), ebpf-reused/nft %s (CPU %s)",
			res.Ratio(B5Init, InitWall, k, EBPF, NFT).RatioString(), res.Ratio(B5Init, InitCPU, k, EBPF, NFT).RatioString(),
			res.Ratio(B5Init, InitWall, k, EBPFReused, NFT).RatioString(), res.Ratio(B5Init, InitCPU, k, EBPFReused, NFT).RatioString())
	}
	return []string{fmt.Sprintf("B5 init container's whole run (`divert istio-iptables`, process start to exit), pods %d–%d: %s; the first pod (eBPF loads the node's programs): %s.",
		from, last, part(last), part(ks[0]))}
}
