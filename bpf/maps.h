// The maps: each pod's own (config, ports, tries, addresses, counters), the sockets' storage
// of the original destination, and the node's (pod_slot, slot_<map>, node_listeners).

struct config_map_def {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config_map SEC(".maps");

// The port lists as bitmaps, one bit per port: every port can be listed (iptables takes
// 10,000 -o ports too) in constant memory, a lookup is one bit test, and the loader swaps
// the whole port policy in one map update.
struct port_sets {
	__u64 outbound_exclude[1024]; // -o
	__u64 outbound_include[1024]; // -q
	__u64 inbound_exclude[1024];  // -d (set only with -b '*')
	__u64 inbound_include[1024];  // -b list
};

struct port_sets_map_def {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_sets);
} port_sets_map SEC(".maps");

// Outbound CIDR sets; the loader inserts prefixes, the connect programs look up whole
// addresses. Two tries, not one with flags, because -x must win over -i even where an -i
// prefix is the longer match; and one pair per family, as istio renders each family's
// ranges into its own table (an IPv6 range such as ::/0 never matches an IPv4 connection,
// which one trie of ::ffff:a.b.c.d keys would make it do). Not preallocated: empty tries
// cost no kernel memory.
struct outbound_exclude_cidrs_def {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} outbound_exclude_cidrs SEC(".maps");

struct outbound_include_cidrs_def {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} outbound_include_cidrs SEC(".maps");

struct outbound_exclude_cidrs6_def {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6_key);
	__type(value, __u8);
} outbound_exclude_cidrs6 SEC(".maps");

struct outbound_include_cidrs6_def {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6_key);
	__type(value, __u8);
} outbound_include_cidrs6 SEC(".maps");

// The pod's own addresses, both families (127.0.0.0/8 and ::1 are implied): iptables'
// "-o lo". Not preallocated: a pod has a few, and 64 preallocated entries were a tenth of its
// kernel memory.
struct local_addrs_def {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct inet_addr);
	__type(value, __u8);
} local_addrs SEC(".maps");

// The pod's nameservers, both families, for DNS capture by nameserver.
struct dns_servers_def {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64); // policy.MaxDNSServers
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct inet_addr);
	__type(value, __u8);
} dns_servers SEC(".maps");

// The owner groups' gids (policy.MaxOwnerGroupsExclude).
struct owner_gids_def {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u8);
} owner_gids SEC(".maps");

// Where a redirected connection was going, kept in the local storage of the app's socket
// (from connect until its handshake is over) and of the proxy's accepted socket (until
// it closes). The kernel frees it with the socket.
enum orig_dst_side {
	SIDE_APP = 1,	// the app's socket: still writing the option
	SIDE_PROXY = 2, // the proxy's accepted socket: answers SO_ORIGINAL_DST
	// The app's socket whose DNS query went to the agent: orig is the nameserver it asked,
	// shown as the source of the agent's replies and as the peer. An unconnected socket
	// keeps the nameserver of its latest query: the hooks see addresses, not payloads, so
	// replies cannot be told apart by query; resolvers ask one nameserver at a time per
	// socket (glibc and Go connect a socket per nameserver, glibc's parallel A and AAAA
	// go to the same one), and one that asks several in parallel from one socket (musl)
	// gets each reply from one of its nameservers, which is what it checks.
	SIDE_DNS = 3,
};

struct sock_orig_dst {
	struct orig_dst orig;
	__u8 side;   // enum orig_dst_side
	__u8 traced; // divert trace wrote this socket's decision (bpf/trace.h); 0 otherwise
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_orig_dst);
} orig_dst_storage SEC(".maps");

// The original destination as it travels in the app's segments: an RFC 6994 experimental
// option (kind 254, 16-bit magic), 10 bytes for IPv4 and 22 for IPv6, told apart by length.
// (A SYN with a TCP Fast Open cookie has 8 bytes left: docs/semantics.md.)
struct orig_dst_opt {
	__u8 kind;
	__u8 len;
	__u16 magic; // network byte order
	__u16 port;  // network byte order
	__u32 addr;  // network byte order
} __attribute__((packed));

// The IPv6 option puts the address before the port, so that in a 4-byte aligned buffer its
// words are aligned (the verifier refuses misaligned stack access); its size is 24 with the
// alignment, of which the option is the first ORIG_DST_OPT6_LEN bytes.
struct orig_dst_opt6 {
	__u8 kind;
	__u8 len;
	__u16 magic;   // network byte order
	__u32 addr[4]; // network byte order
	__u16 port;    // network byte order
} __attribute__((packed, aligned(4)));

#define ORIG_DST_OPT6_LEN 22

// Verdicts by reason, IPv4's (v4-mapped included: IPv4 on the wire) at reason, IPv6's at
// FAMILY_COUNTERS + reason. Each slot costs 8 bytes per CPU: 48 of them, 24 KiB on a
// 64-CPU node.
struct counters_def {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * FAMILY_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

_Static_assert(NUM_REASONS <= FAMILY_COUNTERS, "counters: a family's reasons overlap the next");

struct drops_def {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NUM_DROPS);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

// The proxy's inbound listeners (all sockets listening on the inbound capture port in the
// pod's cgroup), put here by sockops when they call listen(). A closed socket leaves the map
// by itself, so a restarted proxy is found again without the loader. Slots are chosen by
// socket cookie, AF_INET listeners in the first half and AF_INET6 ones in the second, so
// that the only IPv4 listener and the only IPv6 one (Envoy's 0.0.0.0 and [::] in dual
// stack) never take each other's slot. With SO_REUSEPORT any one member of the group is
// enough, as the kernel then picks among the group; 32 slots per family make it very
// unlikely that the only surviving members all lost their slot to a collision.
// Sizes, not BTF types: the kernel refuses BTF on a sockmap (ENOTSUPP), and cilium/ebpf's
// retry without it came after the kernel had freed the refused map, which waits for an RCU
// grace period (10-30 ms per attach here). The map the kernel ends up with is the same.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, LISTENER_SLOTS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} inbound_listeners SEC(".maps");

// The proxy's connections to the pod from a client's address (TPROXY mode's original_src,
// see decide_outbound), from the SYN's departure (sockops TCP_CONNECT) to its lookup: the
// kernel cannot tell sk_lookup such a SYN from the client's own arriving from outside
// (ingress_ifindex is the device of the pod address it goes to, not lo), and without this
// sk_lookup would hand it back to the proxy. An entry lives for one handshake's first SYN;
// LRU, so entries of SYNs that never arrived make room. Should one be evicted before its
// SYN arrives (256 handshakes in flight at once), the proxy gets the connection once more
// and forwards it again. Either family: IPv4 as ::ffff:a.b.c.d.
struct transparent_syn {
	struct inet_addr client;
	struct inet_addr pod;
	__u16 client_port; // network byte order
	__u16 pod_port;	   // host byte order
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 256); // ~29 KiB of kernel memory per pod
	__type(key, struct transparent_syn);
	__type(value, __u8);
} transparent_syns SEC(".maps");

// The programs are loaded once per node and build (loader/node.go) and serve every pod
// attached with them; each pod's own maps above (same definitions as when every pod loaded
// its own programs, so package maps writes them as before) are reached through the node's
// outer maps below, indexed by the pod's slot. A cgroup program finds its pod's slot in
// pod_slot, cgroup storage keyed by the cgroup id alone: the kernel makes one per cgroup the
// programs are attached to, shared by every attach type there, and bpf_get_local_storage
// returns that of the attachment that runs, the pod's cgroup, whatever container below it
// the socket belongs to. It starts zeroed at attach; the loader writes the slot after the
// links are made, and slot 0 means "not armed": every program passes and counts nothing.
// sk_lookup has no cgroup: it is loaded per pod with its slot as a constant.
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_STORAGE);
	__type(key, __u64); // the cgroup id alone: shared by the attach types (Linux 5.9+)
	__type(value, __u32);
} pod_slot SEC(".maps");

volatile const __u32 lookup_slot = 0; // sk_lookup's pod, set at its (per pod) load

#define SLOT_MAP(name)                                    \
	struct {                                          \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS); \
		__uint(max_entries, MAX_SLOTS);           \
		__type(key, __u32);                       \
		__array(values, struct name##_def);       \
	} slot_##name SEC(".maps")

SLOT_MAP(config_map);
SLOT_MAP(port_sets_map);
SLOT_MAP(outbound_exclude_cidrs);
SLOT_MAP(outbound_include_cidrs);
SLOT_MAP(outbound_exclude_cidrs6);
SLOT_MAP(outbound_include_cidrs6);
SLOT_MAP(local_addrs);
SLOT_MAP(dns_servers);
SLOT_MAP(owner_gids);
SLOT_MAP(counters);
SLOT_MAP(drops);

// The node's proxy listeners: pod slot s owns entries s * LISTENER_SLOTS to
// (s + 1) * LISTENER_SLOTS - 1, laid out as inbound_listeners is for one pod (the loader
// empties a slot's range before it gives the slot out). 8 bytes an entry, 512 KiB a node.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, MAX_SLOTS * LISTENER_SLOTS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} node_listeners SEC(".maps");

// slot_inner returns slot's inner map of outer, or 0 when the slot has none.
static __always_inline void *slot_inner(void *outer, __u32 slot)
{
	return bpf_map_lookup_elem(outer, &slot);
}

// cgroup_slot is the pod slot of the cgroup program that runs (0: not armed).
static __always_inline __u32 cgroup_slot(void)
{
	__u32 *slot = bpf_get_local_storage(&pod_slot, 0);
	return *slot;
}
