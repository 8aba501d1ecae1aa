//go:build ignore

// Issue 24's prototype: one program attached to many pods' cgroups finds its pod's slot in
// cgroup storage keyed by the cgroup id alone, which every attach type on that cgroup
// shares. Built by hand: clang-14 -O2 -g -target bpf -Ibpf/include -c slot.c -o slot.o
// (from the repository root, then move slot.o here).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_STORAGE);
	__type(key, __u64); // the cgroup id alone: shared by the attach types (5.9+)
	__type(value, __u32);
} pod_slot SEC(".maps");

// seen[slot * 2 + hook] counts the runs of each hook (0 connect4, 1 sockops) per slot.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

static __always_inline void count(__u32 hook)
{
	__u32 *slot = bpf_get_local_storage(&pod_slot, 0);
	__u32 key = (*slot & 7) * 2 + hook;
	__u64 *n = bpf_map_lookup_elem(&seen, &key);
	if (n)
		__sync_fetch_and_add(n, 1);
}

SEC("cgroup/connect4")
int slot_connect4(struct bpf_sock_addr *ctx)
{
	count(0);
	return 1;
}

SEC("sockops")
int slot_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB)
		count(1);
	return 1;
}
