package bench

import (
	"fmt"
	"strings"
)

// traceSection is B8's part of the report: divert trace off against on.
func traceSection(res *Results) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("## B8 divert trace's cost\n\n")
	w("B1's sequential connections and B2's connection rate on an eBPF pod with `divert trace` off (ebpf) and\n")
	w("on with a reader draining and decoding the ring buffer as `divert trace` does (ebpf-trace); a fresh pod\n")
	w("per state and round, the states taking turns to go first. Off, the programs look one sockmap slot up per\n")
	w("decision and write nothing; on, they write a 72-byte record per decision (and one more with a TCP\n")
	w("connect's source). Every connection made with tracing on reached the reader or was counted lost (the\n")
	w("run fails otherwise).\n\n")
	w("| | ebpf (trace off) | ebpf-trace (trace on) | on / off |\n|---|---|---|---|\n")
	for _, metric := range []string{P50, P90, P99, CPUConn, BPFNS, ConnRate, TraceLost} {
		w("| %s | %s | %s | %s |\n", metric, Summarize(res.Values(B8, metric, 0, EBPF)), Summarize(res.Values(B8, metric, 0, EBPFTrace)),
			res.Ratio(B8, metric, 0, EBPFTrace, EBPF).RatioString())
	}
	w("\n")
	return b.String()
}

// traceSummary is B8's lines of the summary.
func traceSummary(res *Results) []string {
	p50 := res.Ratio(B8, P50, 0, EBPFTrace, EBPF)
	rate := res.Ratio(B8, ConnRate, 0, EBPFTrace, EBPF)
	if p50.N == 0 {
		return nil
	}
	return []string{fmt.Sprintf("B8 divert trace on with a reader, against off: connect p50 on/off = %s, conn/s on/off = %s.",
		p50.RatioString(), rate.RatioString())}
}
