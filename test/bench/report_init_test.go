package bench

import (
	"strings"
	"testing"
)

// B5's init-run rows: groups as B5's, ratios pod by pod, and a summary line that
// `make bench ONLY=B5` splices (it starts with "B5 ").
func TestInitRunReport(t *testing.T) {
	res := &Results{Params: Params{B5Pods: []int{1, 3}}, B5: []PodCost{{Mode: EBPF, Pods: 1, From: 1}}}
	for pod, ms := range []float64{300, 100, 120} { // pod 0 loads the node's programs
		res.Add(B5Init, InitWall, groupOf(res.Params.B5Pods, pod+1), EBPF, pod, ms)
		res.Add(B5Init, InitCPU, groupOf(res.Params.B5Pods, pod+1), EBPF, pod, ms/2)
		res.Add(B5Init, InitWall, groupOf(res.Params.B5Pods, pod+1), EBPFReused, pod, ms/10)
		res.Add(B5Init, InitCPU, groupOf(res.Params.B5Pods, pod+1), EBPFReused, pod, ms/20)
		res.Add(B5Init, InitWall, groupOf(res.Params.B5Pods, pod+1), NFT, pod, 50)
		res.Add(B5Init, InitCPU, groupOf(res.Params.B5Pods, pod+1), NFT, pod, 40)
	}
	sec := initRunSection(res)
	for _, want := range []string{"| 1 | 1 | 300 | 30.0 | 50.0 | – | 6.00 | 0.60 | 150 | 15.0 | 40.0 | – | 3.75 | 0.38 |",
		"| 3 | 2–3 | 110 (100–120) | 11.0 (10.0–12.0) | 50.0 | – | 2.20 (2.00–2.40) | 0.22 (0.20–0.24) | 55.0 (50.0–60.0) | 5.50 (5.00–6.00) | 40.0 | – | 1.38 (1.25–1.50) | 0.14 (0.12–0.15) |"} {
		if !strings.Contains(sec, want) {
			t.Errorf("section lacks %q:\n%s", want, sec)
		}
	}
	lines := initRunSummary(res)
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "B5 ") || !strings.Contains(lines[0], "pods 2–3") ||
		!strings.Contains(lines[0], "ebpf/nft 2.20 (2.00–2.40) (CPU 1.38 (1.25–1.50)), ebpf-reused/nft 0.22 (0.20–0.24) (CPU 0.14 (0.12–0.15))") {
		t.Errorf("summary = %q", lines)
	}
	old := "# Benchmarks\n\n## Summary\n\n- B5 old line.\n- B6 stays.\n\n## B5 per-pod cost\n\nold\n\n## Soak\n\nx\n"
	doc, err := splice(old, Markdown(res, ""), []string{"B5"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(doc, "B5 old line") || !strings.Contains(doc, "- B6 stays.") || !strings.Contains(doc, "- "+lines[0]) ||
		!strings.Contains(doc, "| 3 | 2–3 | 110") {
		t.Errorf("spliced:\n%s", doc)
	}
	if initRunSection(&Results{Params: Params{B5Pods: []int{1, 3}}}) != "" {
		t.Error("a run without init-run rows renders none")
	}
}
