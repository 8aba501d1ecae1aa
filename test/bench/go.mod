// Module bench is make bench (docs/benchmarks.md): divert against istio's iptables rules,
// side by side. A module of its own so divert's go.mod never sees gonum/plot, which only
// draws the report's plots; it drives the root module's packages through the replace below.
module github.com/meshdivert/divert/test/bench

go 1.26.8

require (
	github.com/cilium/ebpf v0.22.0
	github.com/meshdivert/divert v0.0.0
	golang.org/x/sys v0.49.0
	gonum.org/v1/plot v0.17.0
)

require (
	codeberg.org/go-fonts/liberation v0.5.0 // indirect
	codeberg.org/go-latex/latex v0.2.0 // indirect
	codeberg.org/go-pdf/fpdf v0.11.1 // indirect
	git.sr.ht/~sbinet/gg v0.7.0 // indirect
	github.com/ajstarks/svgo v0.0.0-20211024235047-1546f124cd8b // indirect
	github.com/golang/freetype v0.0.0-20170609003504-e2365dfdc4a0 // indirect
	github.com/spf13/pflag v1.1.0 // indirect
	github.com/vishvananda/netlink v1.3.1 // indirect
	github.com/vishvananda/netns v0.0.5 // indirect
	golang.org/x/image v0.30.0 // indirect
	golang.org/x/text v0.32.0 // indirect
)

replace github.com/meshdivert/divert => ../..
