// Package bpf holds divert's eBPF programs and their bpf2go bindings. The generated files
// are committed, so building divert needs no clang; `make generate` rebuilds them with the
// pinned clang-14 against the vendored headers in include/ (include/README.md).
package bpf

//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -nostdinc -Iinclude" -target bpfel -type config -type orig_dst -type sock_orig_dst -type drop -type lpm_v4_key -type lpm_v6_key -type inet_addr -type reason -type port_flag -type port_sets -type owner_groups -type trace_event -type trace_control -type trace_verdict Divert divert.c

// A second object with only sk_lookup's two programs (sk_lookup.c): what a pod in a new slot
// on a warm node loads, parsed without divert.c's other programs (loader/node.go).
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -nostdinc -Iinclude" -target bpfel -no-global-types SkLookup sk_lookup.c
