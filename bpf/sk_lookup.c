//go:build ignore

// sk_lookup alone: the programs of sk_lookup.h (the same code as in divert.c, which keeps
// them for the per-pod layout and its program table), built apart so that a pod taking a
// new slot on a warm node, whose cgroup programs are pinned and whose only load is its
// slot's sk_lookup, parses this small object instead of divert.c's eleven programs and all
// their BTF (issue 24: the parse was a sixth of such an init run's CPU). Every map these
// programs use is a node map (loader/node.go), so loading one creates nothing per pod.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#include "types.h"
#include "maps.h"
#include "lookup.h"
#include "socket.h" // trace.h's trace_outbound calls socket_ids
#include "trace.h"
#include "sk_lookup.h"
