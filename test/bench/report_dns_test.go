package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func dnsResults() *Results {
	res := &Results{Command: "make bench ONLY=B7", Only: []string{"B7"},
		Params: Params{Rounds: 2, B7Queries: 2000, B7Warmup: 200, B7Clients: 4}}
	for round := range 2 {
		for i, m := range []Mode{Explicit, EBPF, NFT, Legacy} {
			res.Add(B7UDP, QueryP50, 0, m, round, 40+10*float64(i))
			res.Add(B7UDP, QPSOne, 0, m, round, 20000-1000*float64(i))
		}
		res.Add(B7UDP, BPFProgNS+" recvmsg4", 0, EBPF, round, 700)
		res.Add(B7UDP, BPFProgNS+" connect4", 0, EBPF, round, 1500)
		res.Add(B7UDP, BPFProgNS+" sk_lookup", 0, EBPF, round, 0) // did not run
	}
	return res
}

func TestDNSReport(t *testing.T) {
	md := Markdown(dnsResults(), "")
	for _, want := range []string{
		"## B7 DNS capture\n",
		"| query p50 µs | 40.0 | 50.0 | 60.0 | 70.0 | 0.83 (0.83–0.83) | 1.25 (1.25–1.25) |",
		"| queries/s, 1 client | 20000 | 19000 | 18000 | 17000 | 1.06 (1.06–1.06) | 0.95 (0.95–0.95) |",
		"- B7 DNS UDP query p50: ebpf/iptables-nft = 0.83 (0.83–0.83); eBPF better than iptables-nft in all 2 rounds.",
		"- B7 DNS UDP queries/s (1 client): ebpf/explicit = 0.95 (0.95–0.95); eBPF worse than explicit in all 2 rounds.",
		"by program: connect4 1500, recvmsg4 700.",
		"2000 sequential\nqueries after 200 warm-up ones",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "TCP:") {
		t.Error("a TCP table without TCP figures")
	}
}

const oldDoc = `# Benchmarks

header

## Summary

- B1 connection setup p50: ebpf/iptables-nft = 0.89.
- B7 DNS UDP query p50: ebpf/iptables-nft = 9.99; old.

## B1 connection setup

b1 table

## B7 DNS capture

old b7

## Soak

soak

## Reading the results

notes
`

// A partial run replaces its own sections and summary lines and nothing else.
func TestSplice(t *testing.T) {
	newDoc := Markdown(dnsResults(), "")
	got, err := splice(oldDoc, newDoc, []string{"B7"})
	if err != nil {
		t.Fatal(err)
	}
	b7 := sections(newDoc)[slicesIndex(sections(newDoc), "## B7 ")]
	want := strings.Replace(oldDoc, "## B7 DNS capture\n\nold b7\n\n", b7, 1)
	want = strings.Replace(want, "- B7 DNS UDP query p50: ebpf/iptables-nft = 9.99; old.\n",
		"- B7 DNS UDP query p50: ebpf/iptables-nft = 0.83 (0.83–0.83); eBPF better than iptables-nft in all 2 rounds.\n"+
			"- B7 DNS UDP query p50: ebpf/explicit = 1.25 (1.25–1.25); eBPF worse than explicit in all 2 rounds.\n"+
			"- B7 DNS UDP queries/s (1 client): ebpf/iptables-nft = 1.06 (1.06–1.06); eBPF better than iptables-nft in all 2 rounds.\n"+
			"- B7 DNS UDP queries/s (1 client): ebpf/explicit = 0.95 (0.95–0.95); eBPF worse than explicit in all 2 rounds.\n", 1)
	if got != want {
		t.Errorf("spliced:\n%s\nwant:\n%s", got, want)
	}

	// A report without B7 gets the section before the soak's.
	noB7 := strings.Replace(oldDoc, "## B7 DNS capture\n\nold b7\n\n", "", 1)
	got, err = splice(noB7, newDoc, []string{"B7"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(got, "b1 table\n\n"+b7+"## Soak\n") {
		t.Errorf("B7 not inserted before the soak:\n%s", got)
	}
	// Nor a soak section: before the reading notes.
	noSoak := strings.Replace(noB7, "## Soak\n\nsoak\n\n", "", 1)
	if got, _ = splice(noSoak, newDoc, []string{"B7"}); !strings.Contains(got, "b1 table\n\n"+b7+"## Reading the results\n") {
		t.Errorf("B7 not inserted before the reading notes:\n%s", got)
	}
	if _, err := splice("# no summary\n", newDoc, []string{"B7"}); err == nil {
		t.Error("a report without a summary was accepted")
	}
}

func slicesIndex(secs []string, prefix string) int {
	for i, s := range secs {
		if strings.HasPrefix(s, prefix) {
			return i
		}
	}
	return -1
}

// Write with a partial run edits benchmarks.md in place and leaves the docs' plots alone.
func TestWritePartial(t *testing.T) {
	docs := t.TempDir()
	if err := os.WriteFile(filepath.Join(docs, "benchmarks.md"), []byte(oldDoc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Write(dnsResults(), t.TempDir(), docs); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(docs, "benchmarks.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(md), "b1 table") || !strings.Contains(string(md), "| query p50 µs | 40.0 |") || strings.Contains(string(md), "old b7") {
		t.Errorf("benchmarks.md:\n%s", md)
	}
	if entries, _ := os.ReadDir(docs); len(entries) != 1 {
		t.Errorf("docs has %d files, want benchmarks.md alone", len(entries))
	}
}
