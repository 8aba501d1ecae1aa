package bench

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"
)

// dnsSection renders B7. It says when and how it was measured, as `make bench ONLY=B7`
// splices it into a report whose other sections come from another run.
func dnsSection(res *Results) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p := res.Params
	rounds := p.Rounds
	if res.Quick {
		rounds = 1 // as b7 runs it
	}
	w("## B7 DNS capture\n\n")
	w("Measured on %s by `%s` (%s; load average %s → %s).", res.Start.UTC().Format("2006-01-02 15:04 UTC"),
		res.Command, res.Elapsed.Round(time.Second), res.Machine.LoadAvg, res.Machine.LoadEnd)
	if res.Quick {
		w(" A quick run: do not quote these numbers.")
	}
	w("\n\n")
	w("A pod with DNS capture (`--redirect-dns`, its nameserver given with `--dns-servers`). The app (uid 1000)\n")
	w("asks the nameserver's port 53, a responder outside the pod whose answers carry another marker and fail\n")
	w("the run: every query must be captured. The capture takes it to the agent stand-in on 127.0.0.1:15053,\n")
	w("uid 1337 in the pod (bench-dns: two threads in blocking recvfrom answering with the %d-byte query and\n", dnsMsgSize)
	w("its marker; TCP with DNS's length prefix), the same responder in every mode. A new socket per query, as\n")
	w("glibc's and Go's resolvers ask: UDP socket, connect, send, recvfrom, close; TCP socket, connect, send,\n")
	w("read, close (a reset). Every answer must come from the stand-in with the address the app asked as the\n")
	w("UDP source and, on each client's first query, as getpeername(): what resolvers check.\n\n")
	w("- **explicit**: no capture; the app asks 127.0.0.1:15053 itself, the floor for any capture.\n")
	w("- **ebpf**: divert attached with that policy: connect4 sends the socket to the agent, recvmsg4 gives the\n")
	w("  answers the nameserver's source, getpeername4 shows it as the peer. The kernel's count of captured\n")
	w("  queries (dns-captured) must equal the app's. \"BPF programs ns/query\" is their run time\n")
	w("  (BPF_ENABLE_STATS, all of the pod's programs, the stand-in's sockets included) per sequential query.\n")
	w("- **iptables-nft / iptables-legacy**: istio-iptables' rules for the same policy: nat REDIRECT to 15053\n")
	w("  in ISTIO_OUTPUT_DNS and the raw table's conntrack zones that keep the app's queries apart from the\n")
	w("  agent's own upstream ones; every UDP query from a new socket is a new conntrack entry.\n\n")
	w("Fresh pods every round (conntrack entries outlive the queries). Per round and mode: %d sequential\n", p.B7Queries)
	w("queries after %d warm-up ones (latency percentiles, queries/s of that one client, CPU time of the pod's\n", p.B7Warmup)
	w("cgroup per query: app, stand-in and the kernel's work for them), then %d resolvers asking back to back\n", p.B7Clients)
	w("for %s (\"queries/s, parallel\"). Median over %d rounds (lowest–highest round); ratios round by round.\n\n", p.B7Duration, rounds)
	modes := []Mode{Explicit, EBPF, NFT, Legacy}
	metrics := []string{QueryP50, QueryP99, QPSOne, QPSParallel, CPUQuery, BPFNSQuery}
	for _, bench := range []string{B7UDP, B7TCP} {
		if res.has(bench) {
			w("%s:\n\n", map[string]string{B7UDP: "UDP", B7TCP: "TCP"}[bench])
			table(&b, res, bench, 0, metrics, modes)
			if line := progBreakdown(res, bench); line != "" {
				w("eBPF programs' ns/query, by program: %s.\n\n", line)
			}
		}
	}
	w("What each mode adds per query. iptables: the query's first packet walks nat OUTPUT to ISTIO_OUTPUT_DNS\n")
	w("and the raw table's zones, gets a new conntrack entry and is NATed to 127.0.0.1:15053; conntrack\n")
	w("un-NATs the answer (its source becomes the nameserver's), and the entry stays behind until its UDP\n")
	w("timeout; over TCP, conntrack sees every packet of the connection. eBPF: connect4 decides once per socket\n")
	w("and keeps the original destination in the socket's storage, recvmsg4 rewrites each answer's source from\n")
	w("it and getpeername4 the peer; the packets cross lo untouched (over TCP, sockops also runs for the\n")
	w("socket's TCP events). Explicit pays none of it: compare it with the others for the capture's cost.\n\n")
	return b.String()
}

// dnsSummary states B7's headline ratios; its lines start with "B7 ", which is how a
// partial run finds them in the report's summary.
func dnsSummary(res *Results) []string {
	var out []string
	for _, bench := range []string{B7UDP, B7TCP} {
		proto := map[string]string{B7UDP: "UDP", B7TCP: "TCP"}[bench]
		for _, c := range []struct {
			metric, what  string
			lowerIsBetter bool
		}{{QueryP50, "query p50", true}, {QPSOne, "queries/s (1 client)", false}, {CPUQuery, "CPU time per query", true}} {
			for _, other := range []Mode{NFT, Explicit} {
				r := res.Ratio(bench, c.metric, 0, EBPF, other)
				if r.N == 0 {
					continue
				}
				out = append(out, fmt.Sprintf("B7 DNS %s %s: ebpf/%s = %s; %s.", proto, c.what, other, r.RatioString(),
					verdict(res.Ratios(bench, c.metric, 0, EBPF, other), c.lowerIsBetter, other)))
			}
		}
	}
	return out
}

// progBreakdown lists the eBPF programs that ran for bench's sequential queries, busiest
// first, with their run time per query.
func progBreakdown(res *Results, bench string) string {
	type prog struct {
		name string
		s    Summary
	}
	var progs []prog
	for _, m := range res.Measurements {
		name, ok := strings.CutPrefix(m.Metric, BPFProgNS+" ")
		if ok && m.Bench == bench && m.Round == 0 && m.Mode == EBPF {
			if s := Summarize(res.Values(bench, m.Metric, 0, EBPF)); s.Median > 0 {
				progs = append(progs, prog{name, s})
			}
		}
	}
	slices.SortFunc(progs, func(a, b prog) int { return cmp.Compare(b.s.Median, a.s.Median) })
	parts := make([]string, len(progs))
	for i, p := range progs {
		parts[i] = p.name + " " + p.s.String()
	}
	return strings.Join(parts, ", ")
}

func (r *Results) has(bench string) bool {
	return slices.ContainsFunc(r.Measurements, func(m Measurement) bool { return m.Bench == bench })
}

// splice replaces, in the report old, the sections (## headings) of the benchmarks in only
// by those of the report new, and their lines in the summary; a section old lacks goes
// before the soak's or the reading notes. Everything else in old, other runs' numbers included, stays as it is.
func splice(old, new string, only []string) (string, error) {
	oldSecs, newSecs := sections(old), sections(new)
	mine := func(heading string, prefix string) bool {
		for _, b := range only {
			if strings.HasPrefix(heading, prefix+b+" ") {
				return true
			}
		}
		return false
	}
	summary := slices.IndexFunc(oldSecs, func(s string) bool { return strings.HasPrefix(s, "## Summary\n") })
	if summary < 0 {
		return "", fmt.Errorf("the report has no summary to update")
	}
	var lines []string
	for _, l := range strings.SplitAfter(oldSecs[summary], "\n") {
		if l != "" && !mine(l, "- ") {
			lines = append(lines, l)
		}
	}
	for len(lines) > 1 && lines[len(lines)-1] == "\n" {
		lines = lines[:len(lines)-1]
	}
	for _, s := range newSecs {
		if strings.HasPrefix(s, "## Summary\n") {
			for _, l := range strings.SplitAfter(s, "\n") {
				if mine(l, "- ") {
					lines = append(lines, l)
				}
			}
		}
	}
	oldSecs[summary] = strings.Join(lines, "") + "\n"
	for _, s := range newSecs {
		if !mine(s, "## ") {
			continue
		}
		head := s[:strings.Index(s, "\n")]
		at := slices.IndexFunc(oldSecs, func(o string) bool { return strings.HasPrefix(o, head+"\n") })
		if at >= 0 {
			oldSecs[at] = s
			continue
		}
		at = slices.IndexFunc(oldSecs, func(o string) bool {
			return strings.HasPrefix(o, "## Soak\n") || strings.HasPrefix(o, "## Reading the results\n")
		})
		if at < 0 {
			at = len(oldSecs)
		}
		oldSecs = slices.Insert(oldSecs, at, s)
	}
	return strings.Join(oldSecs, ""), nil
}

// sections cuts a report at its "## " headings; the text before the first is the first.
func sections(doc string) []string {
	var out []string
	start := 0
	for i := 0; i < len(doc); {
		j := strings.IndexByte(doc[i:], '\n')
		if j < 0 {
			break
		}
		if i > 0 && strings.HasPrefix(doc[i:], "## ") {
			out = append(out, doc[start:i])
			start = i
		}
		i += j + 1
	}
	return append(out, doc[start:])
}
