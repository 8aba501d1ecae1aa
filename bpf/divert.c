//go:build ignore

// divert: outbound capture for service-mesh sidecars, the eBPF rendering of the
// istio-iptables ISTIO_OUTPUT chain (and of ip6tables' twin for IPv6). Three cgroup programs
// work together:
//   connect4/6 decide per connection (same rule order as policy.Decide) and rewrite the
//              destination to 127.0.0.1 or [::1] at the proxy's port, keeping the original
//              in the app's socket's local storage;
//   sockops    carries it to the proxy: the app's socket writes it as a TCP option into its
//              handshake segments (they only ever cross loopback), and the proxy's accepted
//              socket reads it from the segment that establishes it into its own storage;
//   getsockopt answers SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6) on the
//              proxy's accepted socket from that storage, so an unmodified proxy reads the
//              address the app dialled, as with iptables.
// The original destination lives with the two sockets and dies with them: no table of
// connections that could fill up, evict, or leak, whatever the burst or the number of CPUs.
// Inbound, an sk_lookup program on the pod's netns hands connections to included ports to
// the proxy's inbound listener without NAT: the accepted socket's local address is the
// original destination. sockops finds that listener when the proxy calls listen().
// DNS capture (istio's --redirect-dns): connect4/6 (UDP and TCP) and sendmsg4/6 (unconnected
// UDP) send queries to a nameserver's port 53 to the agent on 127.0.0.1 or [::1]:15053,
// keeping the nameserver in the app socket's storage; recvmsg4/6 and getpeername4/6 show the
// app the nameserver wherever the kernel would show it the agent, as iptables' conntrack does.
// Both families go through the same code: an IPv4 address is held as ::ffff:a.b.c.d, as a
// dual-stack socket names it, so the family of a connection is that of its address.
// Exclusions live in maps, not code: a policy change is a map update.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define DNS_PORT 53
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* and IP6T_SO_ORIGINAL_DST, its SOL_IPV6 twin */
#define TCPHDR_SYN 0x02
#define TCPOPT_EXP 254	     /* RFC 6994 experimental option, told apart by its magic */
#define ORIG_DST_MAGIC 0xd17e /* "divert" */
#define SK_DROP 0
#define SK_PASS 1
#define LISTENER_SLOTS 64 /* half for AF_INET listeners, half for AF_INET6 ones */
#define MAX_SLOTS 512	  /* pods per node with the node's programs (kubelet allows 110 by default); slot 0 is "not armed" */
#define FAMILY_COUNTERS 24 /* counters per family (room for more reasons): IPv4's, then IPv6's */
#define LOCALHOST 0x7f000001		 /* 127.0.0.1, host order */
#define INBOUND_PASSTHROUGH 0x7f000006 /* 127.0.0.6, host order */
#define LOCALHOST6 1			 /* ::1, low word, host order */
#define INBOUND_PASSTHROUGH6 6		 /* ::6, low word, host order */

// Reasons are policy.Reason: same names, same numbers (bpf's tests keep them equal).
enum reason {
	REASON_NONE,
	REASON_EXCLUDED_OUTBOUND_PORT,
	REASON_INBOUND_PASSTHROUGH,
	REASON_PROXY_HAIRPIN,
	REASON_LOCAL_DESTINATION,
	REASON_PROXY_UID,
	REASON_PROXY_GID,
	REASON_LOCALHOST,
	REASON_EXCLUDED_CIDR,
	REASON_INCLUDED_OUTBOUND_PORT,
	REASON_INCLUDED_CIDR,
	REASON_NOT_INCLUDED,
	REASON_INBOUND_TUNNEL_PORT,
	REASON_INBOUND_EXCLUDED_PORT,
	REASON_INBOUND_INCLUDED_PORT,
	REASON_INBOUND_NOT_INCLUDED,
	REASON_DNS_CAPTURED,
	REASON_DNS_NOT_CAPTURED,
	REASON_OWNER_GROUP_NOT_INCLUDED,
	REASON_OWNER_GROUP_EXCLUDED,
	REASON_EXCLUDED_INTERFACE,	      // -c: only the iptables backend renders it
	REASON_VIRTUAL_INTERFACE,	      // -k: likewise
	REASON_VIRTUAL_INTERFACE_NOT_INCLUDED, // -k: likewise
	NUM_REASONS,
};

// Bits of the ports map: which lists a port is on.
enum port_flag {
	PORT_OUTBOUND_EXCLUDE = 1 << 0, // -o
	PORT_OUTBOUND_INCLUDE = 1 << 1, // -q
	PORT_INBOUND_EXCLUDE = 1 << 2,	// -d
	PORT_INBOUND_INCLUDE = 1 << 3,	// -b
};

// What the programs give up on, counted in the drops map: every give-up is visible in
// status and metrics, never silent.
enum drop {
	DROP_NO_LISTENER,	 // inbound captured, no proxy listening: refused
	DROP_CONNECT_NO_MEMORY, // no socket storage for the original destination (or the DNS
				// query's nameserver): connect or send refused
	DROP_ORIG_DST_UNSENT,	 // the app's handshake segment had no room for the option
	DROP_ORIG_DST_UNSTORED, // the proxy's socket got it but could not keep it
	DROP_TRANSPARENT_UNSTORED, // TPROXY: the proxy's original_src SYN not written down for
				   // sk_lookup (it reaches the proxy once more)
	NUM_DROPS,
};

// Emit the enums into BTF so bpf2go generates their Go constants.
const enum reason *unused_reason __attribute__((unused));
const enum port_flag *unused_port_flag __attribute__((unused));
const enum drop *unused_drop __attribute__((unused));

struct config {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 proxy_port; // host byte order, like all ports in config and maps keys
	__u16 inbound_capture_port;
	__u16 inbound_tunnel_port;
	__u8 outbound_include_all; // -i '*'
	__u8 inbound_include_all;  // -b '*'
	__u8 capture_loopback;	   // -i names a loopback range: no "local passes" rules
	__u8 inbound_tunnel_passes; // REDIRECT mode; TPROXY captures the tunnel port too
	__u8 dns_capture;	    // --redirect-dns (with nameservers, or capture-all)
	__u8 dns_capture_all;	    // --capture-all-dns: every destination's port 53
	__u16 dns_agent_port;	    // where captured queries go on 127.0.0.1 or [::1] (15053)
	__u8 owner_groups;	    // enum owner_groups: istio's ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]
	__u8 capture_ipv6;	    // istio writes ip6tables rules: native IPv6 is captured too
};

enum owner_groups {
	OWNER_GROUPS_ALL = 0,  // no filter
	OWNER_GROUPS_ONLY = 1, // capture only the groups in owner_gids
	OWNER_GROUPS_NOT = 2,  // never capture the groups in owner_gids
};
const enum owner_groups *unused_owner_groups __attribute__((unused));

// An IPv4 or IPv6 address in network byte order, IPv4 as ::ffff:a.b.c.d.
struct inet_addr {
	__u32 w[4];
};

struct lpm_v4_key {
	__u32 prefixlen;
	__u32 addr; // network byte order
};

struct lpm_v6_key {
	__u32 prefixlen;
	__u32 addr[4]; // network byte order
};

// The tries' keys by value: clang's BTF names a struct reached only through a pointer in a
// map-in-map's inner definition as a forward declaration, which cilium/ebpf cannot size.
struct lpm_v4_key unused_lpm_v4_key __attribute__((unused));
struct lpm_v6_key unused_lpm_v6_key __attribute__((unused));

struct orig_dst {
	struct inet_addr addr;
	__u16 port; // network byte order
	__u16 pad;
};

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
// empties a slot's range before it gives the slot out). 8 bytes an entry, 256 KiB a node.
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

// is_v4 tells IPv4 (::ffff:a.b.c.d) from IPv6. Tests of addresses combine the words
// without a branch per word: each branch would fork the verifier's walk of what follows.
static __always_inline int is_v4(const struct inet_addr *a)
{
	return (a->w[0] | a->w[1] | (a->w[2] ^ bpf_htonl(0x0000ffff))) == 0;
}

static __always_inline int is_zero6(const struct inet_addr *a)
{
	return (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0;
}

static __always_inline struct inet_addr v4_addr(__u32 addr)
{
	return (struct inet_addr){.w = {0, 0, bpf_htonl(0x0000ffff), addr}};
}

// LOAD reads a context or socket field where it stands: clang would otherwise merge the
// reads of an IPv4 and an IPv6 field on two paths into one load through a pointer chosen
// on each, a modified context pointer, which the verifier refuses. The barrier holds a
// whole register (a 32-bit operand there miscompiled connect6 with clang 14).
#define LOAD(field)                                \
	({                                         \
		__u64 __v = (field);               \
		asm volatile("" : "+r"(__v));      \
		(__u32)__v;                        \
	})

// V6_ADDR copies an address from a context's or socket's four words.
#define V6_ADDR(words)                                                                     \
	((struct inet_addr){.w = {LOAD((words)[0]), LOAD((words)[1]), LOAD((words)[2]),   \
				  LOAD((words)[3])}})

static __always_inline int addr_eq(const struct inet_addr *a, const struct inet_addr *b)
{
	return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) | (a->w[2] ^ b->w[2]) | (a->w[3] ^ b->w[3])) == 0;
}

// localhost is the family's 127.0.0.1 or ::1; passthrough its 127.0.0.6 or ::6.
static __always_inline struct inet_addr localhost(int v4)
{
	return v4 ? v4_addr(bpf_htonl(LOCALHOST)) : (struct inet_addr){.w = {0, 0, 0, bpf_htonl(LOCALHOST6)}};
}

static __always_inline struct inet_addr passthrough(int v4)
{
	return v4 ? v4_addr(bpf_htonl(INBOUND_PASSTHROUGH))
		  : (struct inet_addr){.w = {0, 0, 0, bpf_htonl(INBOUND_PASSTHROUGH6)}};
}

static __always_inline void count(__u32 slot, enum reason r, int v4)
{
	__u32 key = r + (v4 ? 0 : FAMILY_COUNTERS);
	void *m = slot_inner(&slot_counters, slot);
	__u64 *n = m ? bpf_map_lookup_elem(m, &key) : 0;
	if (n)
		*n += 1;
}

static __always_inline void count_drop(__u32 slot, enum drop d)
{
	__u32 key = d;
	void *m = slot_inner(&slot_drops, slot);
	__u64 *n = m ? bpf_map_lookup_elem(m, &key) : 0;
	if (n)
		*n += 1;
}

// get_config is the slot's config, or 0 (then the program passes: an unarmed slot).
static __always_inline struct config *get_config(__u32 slot)
{
	__u32 key = 0;
	void *m = slot ? slot_inner(&slot_config_map, slot) : 0;
	return m ? bpf_map_lookup_elem(m, &key) : 0;
}

static __always_inline int port_in(__u64 *set, __u16 port)
{
	return (set[port >> 6] >> (port & 63)) & 1;
}

// port_flags says which lists a port is on, as enum port_flag bits.
static __always_inline __u8 port_flags(__u32 slot, __u16 port)
{
	__u32 key = 0;
	void *m = slot_inner(&slot_port_sets_map, slot);
	struct port_sets *sets = m ? bpf_map_lookup_elem(m, &key) : 0;
	if (!sets)
		return 0;
	return (port_in(sets->outbound_exclude, port) ? PORT_OUTBOUND_EXCLUDE : 0) |
	       (port_in(sets->outbound_include, port) ? PORT_OUTBOUND_INCLUDE : 0) |
	       (port_in(sets->inbound_exclude, port) ? PORT_INBOUND_EXCLUDE : 0) |
	       (port_in(sets->inbound_include, port) ? PORT_INBOUND_INCLUDE : 0);
}

// Lookups by address are global functions taking the address's words: the verifier checks
// each once, on its own, and its callers see one unknown answer, instead of walking every
// outcome of the lookup through all the rules that follow (a lookup in line doubled the
// verifier's work on connect6). Global functions need Linux 5.6 and BTF. A global function
// cannot take a map, so each finds its pod's inner map from the slot it is given.

// addr_is_local reports whether the address w is the pod itself: all of 127.0.0.0/8, ::1,
// and the pod's own addresses (those route via lo).
__noinline int addr_is_local(__u32 slot, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	struct inet_addr a = {.w = {w0, w1, w2, w3}};
	if (is_v4(&a) ? (bpf_ntohl(w3) >> 24) == 127 : (w0 | w1 | w2 | (w3 ^ bpf_htonl(LOCALHOST6))) == 0)
		return 1;
	void *m = slot_inner(&slot_local_addrs, slot);
	return m && bpf_map_lookup_elem(m, &a) != NULL;
}

// addr_is_nameserver reports whether the address w is one of the pod's nameservers.
__noinline int addr_is_nameserver(__u32 slot, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	struct inet_addr a = {.w = {w0, w1, w2, w3}};
	void *m = slot_inner(&slot_dns_servers, slot);
	return m && bpf_map_lookup_elem(m, &a) != NULL;
}

// addr_in_cidrs looks the address w up in its family's trie of -x ranges, or with include
// of -i ranges, of the pod in slot_include >> 1 (include is its low bit: a global function
// takes five scalars at most).
__noinline int addr_in_cidrs(__u32 slot_include, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	struct inet_addr a = {.w = {w0, w1, w2, w3}};
	__u32 slot = slot_include >> 1;
	int include = slot_include & 1;
	void *m;
	if (is_v4(&a)) {
		struct lpm_v4_key key = {.prefixlen = 32, .addr = w3};
		if (include)
			m = slot_inner(&slot_outbound_include_cidrs, slot);
		else
			m = slot_inner(&slot_outbound_exclude_cidrs, slot);
		return m && bpf_map_lookup_elem(m, &key) != NULL;
	}
	struct lpm_v6_key key = {.prefixlen = 128, .addr = {w0, w1, w2, w3}};
	if (include)
		m = slot_inner(&slot_outbound_include_cidrs6, slot);
	else
		m = slot_inner(&slot_outbound_exclude_cidrs6, slot);
	return m && bpf_map_lookup_elem(m, &key) != NULL;
}

static __always_inline int is_local(__u32 slot, const struct inet_addr *a)
{
	return addr_is_local(slot, a->w[0], a->w[1], a->w[2], a->w[3]);
}

// addr_is_foreign reports whether the bound source w is set and not the pod's
// (policy.SrcForeign): only a transparent socket can bind such an address.
__noinline int addr_is_foreign(__u32 slot, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	struct inet_addr a = {.w = {w0, w1, w2, w3}};
	if (is_zero6(&a) | (is_v4(&a) & !w3))
		return 0;
	return !addr_is_local(slot, w0, w1, w2, w3);
}

// The kernel's types on the way from the hook's context to the socket file's credentials,
// as CO-RE reads them (only the fields used; offsets come from the kernel's BTF at load).
struct cred___divert {
	struct {
		__u32 val;
	} fsuid, fsgid;
} __attribute__((preserve_access_index));
struct file___divert {
	const struct cred___divert *f_cred;
} __attribute__((preserve_access_index));
struct socket___divert {
	struct file___divert *file;
} __attribute__((preserve_access_index));
struct sock___divert {
	struct socket___divert *sk_socket;
} __attribute__((preserve_access_index));
struct bpf_sock_addr_kern___divert {
	struct sock___divert *sk;
} __attribute__((preserve_access_index));

// Linux 6.2+. Weak: on older kernels the loader resolves it to 0 and refuses owner groups.
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

// What socket_owner returns when it has no ids: this kernel cannot tell (no BTF, or a UDP
// socket before 6.2), or the socket has no file. Real ids are 32 bits each below these.
#define OWNER_UNKNOWN ((__u64)-1)
#define OWNER_NO_FILE ((__u64)-2)

// socket_owner returns the socket file's fsgid << 32 | fsuid: the ids xt_owner's
// --uid-owner and --gid-owner match, those of whoever made the socket (effective, at
// socket()), not the real ids of the task connecting now, which bpf_get_current_uid_gid
// gives: they differ after a setuid/setgid between socket() and connect(), for sockets
// passed to another process, for setuid programs. An MPTCP subflow is grafted onto the
// app's socket, so its file is the app's. From Linux 6.2 any socket is reached through
// bpf_cast_to_kern_ctx; before, a TCP one through bpf_skc_to_tcp_sock (5.10+). Without the
// kernel's BTF (CO-RE has nothing to relocate against) it is OWNER_UNKNOWN, and the code
// that reads kernel structures is dead.
// A global function, verified once rather than at each call site: inlined, its pointer
// walk doubled the verifier's work on the connect programs (attach took twice the CPU).
__attribute__((noinline)) __u64 socket_owner(struct bpf_sock_addr *ctx)
{
	if (!ctx || !__builtin_preserve_type_info(*(struct sock___divert *)0, 0 /* exists */))
		return OWNER_UNKNOWN;
	struct sock___divert *sk;
	if (bpf_cast_to_kern_ctx) {
		struct bpf_sock_addr_kern___divert *kctx = bpf_cast_to_kern_ctx(ctx);
		sk = kctx->sk;
	} else {
		sk = ctx->sk ? (void *)bpf_skc_to_tcp_sock(ctx->sk) : 0;
		if (!sk)
			return OWNER_UNKNOWN; // not TCP
	}
	struct socket___divert *sock = sk ? sk->sk_socket : 0;
	struct file___divert *file = sock ? sock->file : 0;
	if (!file)
		return OWNER_NO_FILE;
	const struct cred___divert *cred = file->f_cred;
	return (__u64)cred->fsgid.val << 32 | cred->fsuid.val;
}

// socket_ids returns the ids decide_outbound matches, gid << 32 | uid: the socket file's
// where the kernel shows them (as xt_owner matches), else the connecting task's.
// socket_owner_listed says whether the socket's owner group is in owner_gids: 1, 0, or -1
// when this kernel cannot tell (never armed then: the loader refuses the setting on such
// a kernel). A socket without a file is in no group, as xt_owner says. Both are global
// functions: in line, their choices on socket_owner's answer forked the verifier's walk of
// every rule after them (connect6 processed twice the instructions).
__noinline __u64 socket_ids(struct bpf_sock_addr *ctx)
{
	__u64 owner = socket_owner(ctx);
	return owner >= OWNER_NO_FILE ? bpf_get_current_uid_gid() : owner;
}

__noinline int socket_owner_listed(struct bpf_sock_addr *ctx, __u32 slot)
{
	__u64 owner = socket_owner(ctx);
	if (owner == OWNER_UNKNOWN)
		return -1;
	if (owner == OWNER_NO_FILE)
		return 0;
	__u32 gid = owner >> 32;
	void *m = slot_inner(&slot_owner_gids, slot);
	return m && bpf_map_lookup_elem(m, &gid) != 0;
}

#define LOOPBACK_IFINDEX 1 /* lo, in every netns */

// kernel_fails says a TCP connect to dst fails whatever the rules, so it is left to the
// kernel and the app sees what it sees under iptables: the route lookup fails before any
// packet exists for a broadcast or multicast route (ENETUNREACH: 255.255.255.255, 224/4,
// lo's 127.255.255.255) and for a loopback source leaving the pod (EINVAL); a socket bound
// to lo (SO_BINDTODEVICE) sends its SYN out lo, where nothing answers an address outside
// 127/8 (a timeout; under iptables, even the proxy's hairpin REDIRECT goes nowhere).
// Captured, each would reach the proxy instead. (The pod's subnet broadcast is a broadcast
// route too, which connect4 cannot look up: docs/semantics.md.) v4-mapped destinations
// are IPv4's. Native IPv6 (ip6tables' kernel): tcp_v6_connect, after this hook, fails a
// multicast destination (ENETUNREACH) and a link-local one from a socket bound to no
// interface (EINVAL), and the route lookup from a socket bound to lo finds nothing but ::1
// (ENETUNREACH). (A link-local destination with a scope id binds the socket after this
// hook, which cannot see it: left to the kernel too, docs/semantics.md.)
// How kernel_fails is told about the socket, as bits, and the pod's slot above them (a
// global function takes five scalars at most).
#define KF_BOUND_DEV 1	  // bound to an interface (SO_BINDTODEVICE, a scoped bind)
#define KF_BOUND_LO 2	  // ... which is lo
#define KF_LOOPBACK_SRC 4 // bound to an IPv4 loopback source
#define KF_SLOT_SHIFT 8
// A global function, as the lookups by address are: in line, its branches forked the
// verifier's walk of every rule after it (connect6 processed twice the instructions).
__noinline int kernel_fails(__u32 w0, __u32 w1, __u32 w2, __u32 w3, __u32 how)
{
	struct inet_addr dst = {.w = {w0, w1, w2, w3}};
	if (!is_v4(&dst)) {
		__u32 a = bpf_ntohl(w0);
		if ((a >> 24) == 0xff)
			return 1; // ff00::/8
		if ((w0 | w1 | w2 | (w3 ^ bpf_htonl(LOCALHOST6))) == 0)
			return 0; // ::1
		return (how & KF_BOUND_LO) || ((a & 0xffc00000) == 0xfe800000 && !(how & KF_BOUND_DEV));
	}
	__u32 d = bpf_ntohl(w3);
	if (d == 0xffffffff || (d >> 28) == 0xe || d == 0x7fffffff)
		return 1;
	if ((d >> 24) == 127)
		return 0;
	return (how & KF_BOUND_LO) ||
	       ((how & KF_LOOPBACK_SRC) && !addr_is_local(how >> KF_SLOT_SHIFT, w0, w1, w2, w3));
}

#include "trace.h"

// decide_outbound mirrors policy.Config.Decide for outbound connections: istio's
// ISTIO_OUTPUT chain, first match wins, with the family's localhost and passthrough
// source (ip6tables' rules are the same with ::1 and ::6). It sets *to_port for redirects.
// UDP is only decided for DNS queries (the callers check dns_query first).
static __always_inline enum reason decide_outbound(struct bpf_sock_addr *ctx, __u32 slot, struct config *cfg, int udp, int v4,
						   const struct inet_addr *src,
						   const struct inet_addr *dst, __u16 dport,
						   __u16 *to_port)
{
	__u64 ids = socket_ids(ctx);
	__u32 uid = (__u32)ids, gid = ids >> 32;
	__u8 pflags = port_flags(slot, dport);
	struct inet_addr lo = localhost(v4), pass_src = passthrough(v4);
	int local = is_local(slot, dst);
	int to_localhost = addr_eq(dst, &lo);
	int dns = cfg->dns_capture && dport == DNS_PORT;
	// The shape of istio's hairpin rules: "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport <tunnel>".
	int hairpinnable = !udp && local && !to_localhost && dport != cfg->inbound_tunnel_port;
	// With DNS capture istio's "local destination" returns are "-p tcp ! --dport 53" and
	// its uid hairpin leaves 53 alone, so queries to a nameserver on the pod reach the DNS
	// rules; its gid hairpin keeps 53.
	int local_returns = !cfg->capture_loopback && !udp && !dns;

	if (pflags & PORT_OUTBOUND_EXCLUDE)
		return REASON_EXCLUDED_OUTBOUND_PORT;
	if (local && addr_eq(src, &pass_src))
		return REASON_INBOUND_PASSTHROUGH;
	// TPROXY mode's passthrough (policy.Config.TransparentPassthrough): the proxy forwards
	// an inbound connection from the client's own address (Envoy's original_src), a source
	// only a transparent socket can bind. istio's nat hairpin catches it and the connection
	// never completes (docs/semantics.md); its mangle rules mean it to pass, and it does.
	// TPROXY is the one mode where the tunnel port does not pass inbound.
	if (local && !cfg->inbound_tunnel_passes && addr_is_foreign(slot, src->w[0], src->w[1], src->w[2], src->w[3]))
		return REASON_INBOUND_PASSTHROUGH;
	if (hairpinnable && !dns && uid == cfg->proxy_uid) {
		*to_port = cfg->inbound_capture_port;
		return REASON_PROXY_HAIRPIN;
	}
	if (local_returns && local && uid != cfg->proxy_uid)
		return REASON_LOCAL_DESTINATION;
	if (uid == cfg->proxy_uid)
		return REASON_PROXY_UID;
	if (hairpinnable && gid == cfg->proxy_gid) {
		*to_port = cfg->inbound_capture_port;
		return REASON_PROXY_HAIRPIN;
	}
	if (local_returns && local && gid != cfg->proxy_gid)
		return REASON_LOCAL_DESTINATION;
	if (gid == cfg->proxy_gid)
		return REASON_PROXY_GID;
	// istio's owner-group rule ("-m owner [!] --gid-owner G ... -j RETURN"). A kernel that
	// cannot tell passes the connection, never captures it.
	if (cfg->owner_groups) {
		int listed = socket_owner_listed(ctx, slot);
		if (cfg->owner_groups == OWNER_GROUPS_ONLY && listed != 1)
			return REASON_OWNER_GROUP_NOT_INCLUDED;
		if (cfg->owner_groups == OWNER_GROUPS_NOT && listed != 0)
			return REASON_OWNER_GROUP_EXCLUDED;
	}
	// istio's ISTIO_OUTPUT_DNS: after the proxy's own traffic, before everything else.
	if (dns && (cfg->dns_capture_all || addr_is_nameserver(slot, dst->w[0], dst->w[1], dst->w[2], dst->w[3]))) {
		*to_port = cfg->dns_agent_port;
		return REASON_DNS_CAPTURED;
	}
	if (to_localhost)
		return REASON_LOCALHOST;
	if (addr_in_cidrs(slot << 1, dst->w[0], dst->w[1], dst->w[2], dst->w[3]))
		return REASON_EXCLUDED_CIDR;
	if (udp) // istio's -q and ISTIO_REDIRECT are "-p tcp"
		return REASON_DNS_NOT_CAPTURED;
	if (pflags & PORT_OUTBOUND_INCLUDE) {
		*to_port = cfg->proxy_port;
		return REASON_INCLUDED_OUTBOUND_PORT;
	}
	if (cfg->outbound_include_all || addr_in_cidrs(slot << 1 | 1, dst->w[0], dst->w[1], dst->w[2], dst->w[3])) {
		*to_port = cfg->proxy_port;
		return REASON_INCLUDED_CIDR;
	}
	return REASON_NOT_INCLUDED;
}

// decide_inbound mirrors policy.Config.Decide for inbound connections: istio's
// ISTIO_INBOUND chain (the same in ip6tables).
static __always_inline enum reason decide_inbound(__u32 slot, struct config *cfg, __u16 port)
{
	if (cfg->inbound_tunnel_passes && port == cfg->inbound_tunnel_port)
		return REASON_INBOUND_TUNNEL_PORT;
	__u8 pflags = port_flags(slot, port);
	// The loader sets PORT_INBOUND_EXCLUDE only with -b '*', as istio renders -d only then.
	if (pflags & PORT_INBOUND_EXCLUDE)
		return REASON_INBOUND_EXCLUDED_PORT;
	if (cfg->inbound_include_all || (pflags & PORT_INBOUND_INCLUDE))
		return REASON_INBOUND_INCLUDED_PORT;
	return REASON_INBOUND_NOT_INCLUDED;
}

// redirect_outbound decides an outbound connect (or datagram) to dst, of the family v4 says,
// from src, and, when it is captured, keeps dst as its original destination in the
// socket's storage. It returns 0 to refuse the connect, 1 to let it go on, and sets
// *to_port when the caller must rewrite the destination to the family's localhost at
// *to_port. For UDP (and for TCP with DNS capture on) it also keeps or forgets the
// nameserver a socket's replies must come from: reconnect says whether this decision
// replaces the socket's peer (connect) rather than adding a datagram (sendmsg).
static __always_inline int redirect_outbound(struct bpf_sock_addr *ctx, __u32 slot, int udp, int reconnect, int v4,
					     const struct inet_addr *src, const struct inet_addr *dst,
					     __u16 *to_port)
{
	struct config *cfg = get_config(slot);
	if (!cfg)
		return 1;
	if (!v4 && !cfg->capture_ipv6)
		return 1; // istio wrote no ip6tables rules: IPv6 is not decided, nor counted
	__u16 dport_be = (__u16)ctx->user_port; // the port's two bytes, as the app wrote them
	__u16 dport = bpf_ntohs(dport_be);
	if (!udp) {
		__u32 dev = ctx->sk ? ctx->sk->bound_dev_if : 0;
		__u32 how = (dev ? KF_BOUND_DEV : 0) | (dev == LOOPBACK_IFINDEX ? KF_BOUND_LO : 0) |
			    ((is_v4(src) & ((bpf_ntohl(src->w[3]) >> 24) == 127)) ? KF_LOOPBACK_SRC : 0) |
			    slot << KF_SLOT_SHIFT;
		if (kernel_fails(dst->w[0], dst->w[1], dst->w[2], dst->w[3], how))
			return 1; // no rule decides it: nothing counted
	}
	enum reason r = REASON_NONE;
	if (!udp || (cfg->dns_capture && dport == DNS_PORT)) {
		r = decide_outbound(ctx, slot, cfg, udp, v4, src, dst, dport, to_port);
		count(slot, r, v4);
		trace_outbound(ctx, r, udp, src, dst, dport, *to_port);
	}
	if (!*to_port) {
		// A UDP socket connected anew no longer talks to the agent: forget the nameserver
		// so its peer is shown as it is.
		if (udp && reconnect && ctx->sk) {
			struct sock_orig_dst *old = bpf_sk_storage_get(&orig_dst_storage, ctx->sk, 0, 0);
			if (old && old->side == SIDE_DNS)
				old->side = 0;
		}
		return 1;
	}

	// Without a place to keep the original destination the proxy could not route the
	// connection (nor the app accept the agent's answers); leaving it uncaptured would
	// silently bypass policy, so refuse it instead.
	struct sock_orig_dst *s = ctx->sk ? bpf_sk_storage_get(&orig_dst_storage, ctx->sk, 0,
								BPF_SK_STORAGE_GET_F_CREATE) : 0;
	if (!s) {
		count_drop(slot, DROP_CONNECT_NO_MEMORY);
		return 0;
	}
	s->orig.addr = *dst;
	s->orig.port = dport_be;
	s->side = r == REASON_DNS_CAPTURED ? SIDE_DNS : SIDE_APP;
	return 1;
}

// sock_proto tells TCP (0) from UDP (1); anything else (-1) is not divert's business.
static __always_inline int sock_proto(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP)
		return 0;
	if (ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP)
		return 1;
	return -1;
}

// decide4 and decide6 run redirect_outbound for an AF_INET or an AF_INET6 socket's
// connect (reconnect) or datagram to the context's address from the source src4 or src,
// and rewrite the destination when it is captured: to 127.0.0.1, or for an AF_INET6 socket
// to ::ffff:127.0.0.1 (IPv4 on the wire, a dual-stack socket dialling ::ffff:a.b.c.d) or ::1
// (native IPv6). They return what the hook returns.
// Both decide on the destination as the kernel routes a connect() to the unspecified
// address: an IPv4 one (0.0.0.0, or ::ffff:0.0.0.0 from a dual-stack socket) to the bound
// source, else to 127.0.0.1 (ip_route_connect); an IPv6 one (::) to ::1, or to 127.0.0.1
// when the socket is bound to a v4-mapped source (tcp_v6_connect's and
// ip6_datagram_connect's "connect to self"). That is what iptables sees and what the proxy
// must read back.
static __always_inline int decide4(struct bpf_sock_addr *ctx, __u32 slot, int udp, int reconnect, __u32 src4)
{
	__u32 dst4 = ctx->user_ip4;
	if (!dst4)
		dst4 = src4 ? src4 : bpf_htonl(LOCALHOST);
	struct inet_addr src = v4_addr(src4), dst = v4_addr(dst4);
	__u16 to_port = 0;
	if (!redirect_outbound(ctx, slot, udp, reconnect, 1, &src, &dst, &to_port))
		return 0;
	if (to_port) {
		ctx->user_ip4 = bpf_htonl(LOCALHOST);
		ctx->user_port = bpf_htons(to_port);
	}
	return 1;
}

static __always_inline int decide6(struct bpf_sock_addr *ctx, __u32 slot, int udp, int reconnect,
				   const struct inet_addr *src)
{
	struct inet_addr dst = V6_ADDR(ctx->user_ip6);
	int v4 = is_v4(&dst);
	if (v4 && !dst.w[3])
		dst.w[3] = src->w[3] && is_v4(src) ? src->w[3] : bpf_htonl(LOCALHOST);
	else if (!v4 && is_zero6(&dst)) {
		v4 = is_v4(src);
		dst = localhost(v4);
	}
	__u16 to_port = 0;
	if (!redirect_outbound(ctx, slot, udp, reconnect, v4, src, &dst, &to_port))
		return 0;
	if (to_port) {
		struct inet_addr lo = localhost(v4);
		ctx->user_ip6[0] = lo.w[0];
		ctx->user_ip6[1] = lo.w[1];
		ctx->user_ip6[2] = lo.w[2];
		ctx->user_ip6[3] = lo.w[3];
		ctx->user_port = bpf_htons(to_port);
	}
	return 1;
}

// sock_src6 is an AF_INET6 socket's bound source (:: if none): a v4-mapped bind
// (::ffff:127.0.0.6) is ::ffff:a.b.c.d here, as the socket itself holds it.
static __always_inline struct inet_addr sock_src6(struct bpf_sock *sk)
{
	if (!sk)
		return (struct inet_addr){};
	return V6_ADDR(sk->src_ip6);
}

SEC("cgroup/connect4")
int divert_connect4(struct bpf_sock_addr *ctx)
{
	__u32 slot = cgroup_slot();
	int udp = sock_proto(ctx);
	if (!slot || udp < 0)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	return decide4(ctx, slot, udp, 1, sk ? sk->src_ip4 : 0);
}

// An AF_INET6 socket's connect: native IPv6 (captured when istio would write ip6tables
// rules), or, from a dual-stack socket (Java's default, and any runtime that opens IPv6
// sockets for everything), an IPv4 destination as ::ffff:a.b.c.d: IPv4 on the wire, so
// istio's IPv4 rules capture it, but the kernel runs connect6 programs for it, not
// connect4. Each gets its family's policy.
SEC("cgroup/connect6")
int divert_connect6(struct bpf_sock_addr *ctx)
{
	__u32 slot = cgroup_slot();
	int udp = sock_proto(ctx);
	if (!slot || udp < 0)
		return 1;
	struct inet_addr src = sock_src6(ctx->sk);
	return decide6(ctx, slot, udp, 1, &src);
}

// An unconnected UDP socket's datagram (sendto, sendmsg with an address): DNS queries to a
// nameserver go to the agent. The source is the one given with IP_PKTINFO, else the bound
// one. The kernel does not run this for a connected socket's send(): connect4 decided it.
SEC("cgroup/sendmsg4")
int divert_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u32 slot = cgroup_slot();
	if (!slot || sock_proto(ctx) != 1)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	// A dual-stack socket connected to ::ffff:a.b.c.d runs this for each send(), with its
	// peer as the address (udpv6_sendmsg hands udp_sendmsg a sockaddr_in): connect6 decided
	// that peer already, and deciding again would count it twice.
	if (sk && sk->family == AF_INET6 && sk->state == BPF_TCP_ESTABLISHED &&
	    sk->dst_ip4 == ctx->user_ip4)
		return 1;
	return decide4(ctx, slot, 1, 0, ctx->msg_src_ip4 ? ctx->msg_src_ip4 : (sk ? sk->src_ip4 : 0));
}

// sendmsg4's twin for AF_INET6 sockets: native IPv6 datagrams (the source given with
// IPV6_PKTINFO, else the bound one), and datagrams to ::ffff:a.b.c.d, which the kernels
// here hand to udp_sendmsg before the IPv6 hook, so sendmsg4 decides them; this keeps a
// kernel that runs the IPv6 hook first deciding them the same.
SEC("cgroup/sendmsg6")
int divert_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 slot = cgroup_slot();
	if (!slot || sock_proto(ctx) != 1)
		return 1;
	struct inet_addr src = V6_ADDR(ctx->msg_src_ip6);
	if (is_zero6(&src))
		src = sock_src6(ctx->sk);
	return decide6(ctx, slot, 1, 0, &src);
}

// dns_peer returns the nameserver to show in place of the agent (the family's localhost
// at the agent's port) on a socket whose DNS query went to the agent, or 0 where the
// address is to be left as it is.
static __always_inline struct orig_dst *dns_peer(struct bpf_sock_addr *ctx, const struct inet_addr *a)
{
	struct inet_addr lo = localhost(is_v4(a));
	if (!addr_eq(a, &lo) || !ctx->sk)
		return 0;
	struct config *cfg = get_config(cgroup_slot());
	if (!cfg || (__u16)ctx->user_port != bpf_htons(cfg->dns_agent_port))
		return 0;
	struct sock_orig_dst *s = bpf_sk_storage_get(&orig_dst_storage, ctx->sk, 0, 0);
	if (!s || s->side != SIDE_DNS)
		return 0;
	return &s->orig;
}

// The agent's reply, as recvfrom/recvmsg report its source, and the socket's peer, as
// getpeername reports it: the nameserver the app asked, never the agent (glibc, dig and
// Go drop answers from an address they did not query). The return value is ignored by the
// kernel for these hooks; 1 is the documented one.
static __always_inline int show_nameserver4(struct bpf_sock_addr *ctx)
{
	struct inet_addr a = v4_addr(ctx->user_ip4);
	struct orig_dst *ns = dns_peer(ctx, &a);
	if (ns && is_v4(&ns->addr)) {
		ctx->user_ip4 = ns->addr.w[3];
		ctx->user_port = ns->port;
	}
	return 1;
}

static __always_inline int show_nameserver6(struct bpf_sock_addr *ctx)
{
	struct inet_addr a = V6_ADDR(ctx->user_ip6);
	struct orig_dst *ns = dns_peer(ctx, &a);
	if (ns) {
		ctx->user_ip6[0] = ns->addr.w[0];
		ctx->user_ip6[1] = ns->addr.w[1];
		ctx->user_ip6[2] = ns->addr.w[2];
		ctx->user_ip6[3] = ns->addr.w[3];
		ctx->user_port = ns->port;
	}
	return 1;
}

SEC("cgroup/recvmsg4")
int divert_recvmsg4(struct bpf_sock_addr *ctx) { return show_nameserver4(ctx); }

SEC("cgroup/recvmsg6")
int divert_recvmsg6(struct bpf_sock_addr *ctx) { return show_nameserver6(ctx); }

SEC("cgroup/getpeername4")
int divert_getpeername4(struct bpf_sock_addr *ctx) { return show_nameserver4(ctx); }

SEC("cgroup/getpeername6")
int divert_getpeername6(struct bpf_sock_addr *ctx) { return show_nameserver6(ctx); }

// The app's side of a captured connection: from connect until the proxy's side is surely
// established, the segments the app sends carry the original destination as a TCP option.
// Normally the handshake's last ACK establishes the proxy's socket and the option is
// read there; if that ACK is lost (the proxy's accept queue was full) or a SYN cookie stood
// in for the request, a later segment establishes it instead, so that one needs it too
// (a TCP Fast Open socket is established by the SYN itself). Once the proxy has acknowledged
// data or sent some, its socket is established and the option stops.
// The SYN carries the 10-byte IPv4 option where it has room, but never the 22-byte IPv6 one:
// beside MSS, SACK-permitted, timestamps and window scale (20 bytes) only 20 of TCP's 40
// bytes of options are left. The later segments carry the timestamps alone (12 bytes),
// which leaves room for either (36 of 40 bytes with IPv6's, padded); the SYN never
// establishes the proxy's socket, but with a Fast Open cookie, which leaves no room for
// either option (counted as orig-dst-unsent).
static __always_inline void app_handshake(struct bpf_sock_ops *skops, __u32 slot)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct sock_orig_dst *s = bpf_sk_storage_get(&orig_dst_storage, sk, 0, 0);
	if (!s || s->side != SIDE_APP)
		return;
	int v4 = is_v4(&s->orig.addr);

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		return;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		// The SYN-ACK's acknowledgement of our SYN counts one byte.
		if (skops->bytes_acked > 1 || skops->bytes_received > 0) {
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
								 ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
			return;
		}
		if (!v4 && (skops->skb_tcp_flags & TCPHDR_SYN)) {
			// A SYN with a Fast Open cookie (with data or not) establishes the proxy's
			// socket by itself: then the destination is lost, as for IPv4, whose option
			// finds no room beside the cookie either. Probing with IPv4's size tells that
			// SYN (8 bytes left) from the others (16 or 20 left); the space a probe gets
			// is left unwritten, which the kernel fills with NOPs.
			if (bpf_reserve_hdr_opt(skops, sizeof(struct orig_dst_opt), 0))
				count_drop(slot, DROP_ORIG_DST_UNSENT);
			return;
		}
		if (bpf_reserve_hdr_opt(skops, v4 ? sizeof(struct orig_dst_opt) : ORIG_DST_OPT6_LEN, 0))
			count_drop(slot, DROP_ORIG_DST_UNSENT);
		return;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB: {
		if (!v4 && (skops->skb_tcp_flags & TCPHDR_SYN))
			return; // the probe's space (above)
		long err;
		if (v4) {
			struct orig_dst_opt opt = {
				.kind = TCPOPT_EXP,
				.len = sizeof(opt),
				.magic = bpf_htons(ORIG_DST_MAGIC),
				.port = s->orig.port,
				.addr = s->orig.addr.w[3],
			};
			err = bpf_store_hdr_opt(skops, &opt, sizeof(opt), 0);
		} else {
			struct orig_dst_opt6 opt = {
				.kind = TCPOPT_EXP,
				.len = ORIG_DST_OPT6_LEN,
				.magic = bpf_htons(ORIG_DST_MAGIC),
				.addr = {s->orig.addr.w[0], s->orig.addr.w[1], s->orig.addr.w[2], s->orig.addr.w[3]},
				.port = s->orig.port,
			};
			err = bpf_store_hdr_opt(skops, &opt, ORIG_DST_OPT6_LEN, 0);
		}
		// EEXIST: a retransmission that already carries it.
		if (err && err != -17)
			count_drop(slot, DROP_ORIG_DST_UNSENT);
		return;
	}
	}
}

// proxied reports which family's redirected connections a socket could be one of: to the
// family's localhost, where redirects go, from the pod's own addresses of that family
// (127.0.0.1 or ::1, or the address an app bound before connecting; IPv4 also on an
// AF_INET6 socket, as ::ffff:a.b.c.d). 1 for IPv4, 2 for IPv6, 0 for neither: a peer
// outside the pod cannot make the proxy believe another destination (the kernel drops
// packets to 127/8 or ::1 arriving on other devices than lo).
static __always_inline int proxied(struct bpf_sock_ops *skops, __u32 slot)
{
	struct inet_addr remote, local;
	if (skops->family == AF_INET6) {
		remote = V6_ADDR(skops->remote_ip6);
		local = V6_ADDR(skops->local_ip6);
	} else if (skops->family == AF_INET) {
		remote = v4_addr(LOAD(skops->remote_ip4));
		local = v4_addr(LOAD(skops->local_ip4));
	} else {
		return 0;
	}
	int v4 = is_v4(&local);
	struct inet_addr lo = localhost(v4);
	if (!addr_eq(&local, &lo) || is_v4(&remote) != v4 || !is_local(slot, &remote))
		return 0;
	return v4 ? 1 : 2;
}

// The proxy's side: its accepted socket reads the option from the segment that
// established it (the SYN itself under TCP Fast Open with a cookie) and keeps the original
// destination for getsockopt. Only connections of the option's own family (proxied).
static __always_inline void proxy_established(struct bpf_sock_ops *skops, __u32 slot)
{
	int family = proxied(skops, slot);
	if (!family)
		return;
	// One buffer for either option; the IPv4 one's address sits at an odd 2-byte offset, so
	// it is copied out (two 2-byte loads) rather than read as a word.
	struct orig_dst_opt6 opt = {.kind = TCPOPT_EXP, .len = 4, .magic = bpf_htons(ORIG_DST_MAGIC)};
	long n = bpf_load_hdr_opt(skops, &opt, ORIG_DST_OPT6_LEN, 0);
	struct inet_addr orig;
	__u16 port;
	if (family == 1 && n == sizeof(struct orig_dst_opt)) {
		struct orig_dst_opt *o4 = (void *)&opt;
		__u32 a;
		__builtin_memcpy(&a, &o4->addr, sizeof(a));
		orig = v4_addr(a);
		port = o4->port;
	} else if (family == 2 && n == ORIG_DST_OPT6_LEN) {
		orig = V6_ADDR(opt.addr);
		port = opt.port;
	} else {
		return; // not a redirected connection
	}
	struct bpf_sock *sk = skops->sk;
	struct sock_orig_dst *s =
		sk ? bpf_sk_storage_get(&orig_dst_storage, sk, 0, BPF_SK_STORAGE_GET_F_CREATE) : 0;
	if (!s) {
		count_drop(slot, DROP_ORIG_DST_UNSTORED);
		return;
	}
	s->orig.addr = orig;
	s->orig.port = port;
	s->side = SIDE_PROXY;
}

// transparent_connect writes down a TPROXY pod's connection from a source that is not the
// pod's to the pod itself (the one connect4 or connect6 let pass as inbound passthrough),
// for sk_lookup: IPv4 (from an AF_INET socket, or a dual-stack one as ::ffff:a.b.c.d) or
// native IPv6.
static __always_inline void transparent_connect(struct bpf_sock_ops *skops, __u32 slot)
{
	struct inet_addr client, pod;
	if (skops->family == AF_INET6) {
		client = V6_ADDR(skops->local_ip6);
		pod = V6_ADDR(skops->remote_ip6);
	} else if (skops->family == AF_INET) {
		client = v4_addr(LOAD(skops->local_ip4));
		pod = v4_addr(LOAD(skops->remote_ip4));
	} else {
		return;
	}
	if (!addr_is_foreign(slot, client.w[0], client.w[1], client.w[2], client.w[3]) || !is_local(slot, &pod))
		return;
	struct config *cfg = get_config(slot);
	// Without IPv6 capture sk_lookup leaves IPv6 alone: nothing would take the entry.
	if (!cfg || cfg->inbound_tunnel_passes || (!is_v4(&client) && !cfg->capture_ipv6))
		return;
	struct transparent_syn syn = {
		.client = client,
		.pod = pod,
		.client_port = bpf_htons((__u16)skops->local_port),
		.pod_port = bpf_ntohs((__u16)(skops->remote_port >> 16)), // network order, high half
	};
	__u8 one = 1;
	if (bpf_map_update_elem(&transparent_syns, &syn, &one, BPF_ANY))
		count_drop(slot, DROP_TRANSPARENT_UNSTORED);
}

SEC("sockops")
int divert_sockops(struct bpf_sock_ops *skops)
{
	// The app's handshake runs on in an unarmed slot: only a socket connect4 or connect6
	// captured, when it was armed, carries an original destination.
	__u32 slot = cgroup_slot();
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (slot)
			transparent_connect(skops, slot);
		app_handshake(skops, slot);
		trace_connected(skops);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		app_handshake(skops, slot);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (slot)
			proxy_established(skops, slot);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB: {
		struct config *cfg = get_config(slot);
		if (!cfg || skops->local_port != cfg->inbound_capture_port)
			return 1;
		__u32 half = LISTENER_SLOTS / 2;
		__u32 i = slot * LISTENER_SLOTS + bpf_get_socket_cookie(skops) % half +
			  (skops->family == AF_INET6 ? half : 0);
		bpf_sock_map_update(skops, &node_listeners, &i, BPF_ANY);
		break;
	}
	}
	return 1;
}

// The original destination of a connection accepted by the proxy, as conntrack answers
// it: getsockopt(SOL_IP, SO_ORIGINAL_DST) for IPv4 connections (on AF_INET6 sockets too,
// ::ffff:a.b.c.d) with a sockaddr_in, getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) for native
// IPv6 ones with a sockaddr_in6. The other family's question keeps the kernel's answer.
SEC("cgroup/getsockopt")
int divert_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		goto passthrough;
	int want4 = ctx->level == SOL_IP;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		goto passthrough;
	struct inet_addr local, peer;
	if (sk->family == AF_INET) {
		local = v4_addr(LOAD(sk->src_ip4));
		peer = v4_addr(LOAD(sk->dst_ip4));
	} else if (sk->family == AF_INET6) {
		local = V6_ADDR(sk->src_ip6);
		peer = V6_ADDR(sk->dst_ip6);
	} else {
		goto passthrough;
	}
	if (is_v4(&local) != want4)
		goto passthrough;

	struct sock_orig_dst *s = bpf_sk_storage_get(&orig_dst_storage, sk, 0, 0);
	struct orig_dst own = {.addr = local, .port = bpf_htons((__u16)sk->src_port)};
	struct orig_dst *orig = &own;
	if (s && s->side == SIDE_PROXY) {
		orig = &s->orig;
	} else {
		// A connection from outside the pod that was not NATed: one sk_lookup steered to
		// the proxy, or one that reached a listener directly. Its original destination is
		// the socket's own local address, which is what conntrack answers for it under
		// iptables. Answer only where the kernel has no answer of its own, and for IPv6
		// only where istio would have written ip6tables rules (conntrack tracks IPv6 then).
		__u32 slot = cgroup_slot();
		struct config *cfg = get_config(slot);
		if (!cfg || ctx->retval == 0 || is_local(slot, &peer) || (!want4 && !cfg->capture_ipv6))
			goto passthrough;
	}
	if (is_v4(&orig->addr) != want4)
		goto passthrough;

	if (want4) {
		struct {
			__u16 family;
			__u16 port;
			__u32 addr;
			__u8 zero[8];
		} *sin = ctx->optval;
		if ((void *)(sin + 1) > ctx->optval_end)
			goto passthrough; // the caller's buffer is too small for a sockaddr_in
		sin->family = AF_INET;
		sin->port = orig->port;
		sin->addr = orig->addr.w[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		// Separate volatile stores: clang would merge the two adjacent 4-byte context
		// fields into one 8-byte store, which the verifier rejects.
		*(volatile __s32 *)&ctx->optlen = sizeof(*sin);
	} else {
		struct {
			__u16 family;
			__u16 port;
			__u32 flowinfo;
			__u32 addr[4];
			__u32 scope_id;
		} *sin6 = ctx->optval;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			goto passthrough; // too small for a sockaddr_in6: the kernel's EINVAL stands
		sin6->family = AF_INET6;
		sin6->port = orig->port;
		sin6->flowinfo = 0;
		sin6->addr[0] = orig->addr.w[0];
		sin6->addr[1] = orig->addr.w[1];
		sin6->addr[2] = orig->addr.w[2];
		sin6->addr[3] = orig->addr.w[3];
		sin6->scope_id = 0;
		*(volatile __s32 *)&ctx->optlen = sizeof(*sin6);
	}
	*(volatile __s32 *)&ctx->retval = 0;
	return 1;

passthrough:
	// optlen 0 tells the kernel to keep its own result untouched; it also avoids EFAULT
	// when the caller's buffer is larger than the page the program was shown.
	ctx->optlen = 0;
	return 1;
}

// TRY_LISTENER hands the connection to the listener in entry i of node_listeners, if there
// is one, it is still the proxy's inbound port (a listener left over from an older -z is
// not), and it takes the connection's family (bpf_sk_assign refuses an AF_INET listener for
// IPv6, and an IPv6-only one for IPv4). It is 1 when the listener took it.
#define TRY_LISTENER(ctx, i, port)                                                      \
	({                                                                              \
		__u32 __i = (i);                                                        \
		struct bpf_sock *__sk = bpf_map_lookup_elem(&node_listeners, &__i);     \
		long __err = -1;                                                        \
		if (__sk) {                                                             \
			__err = __sk->src_port == (port) ? bpf_sk_assign(ctx, __sk, 0) : -1; \
			bpf_sk_release(__sk);                                           \
		}                                                                       \
		!__err;                                                                 \
	})

// try_listener is TRY_LISTENER as a global function: verified once, not once per iteration
// of sk_lookup's loop over the pod's 64 entries, which made sk_lookup, loaded for every pod,
// most of a pod's attach CPU (1,781 instructions processed with it). Linux 5.10 takes no
// sk_lookup context into a global function ("Arg#0 type PTR in try_listener() is not
// supported yet"): there the loader loads divert_sk_lookup_static, which calls
// try_listener_static, verified at each call.
__noinline int try_listener(struct bpf_sk_lookup *ctx, __u32 i, __u32 port)
{
	if (!ctx)
		return 0;
	return TRY_LISTENER(ctx, i, port);
}

static __noinline int try_listener_static(struct bpf_sk_lookup *ctx, __u32 i, __u32 port)
{
	return TRY_LISTENER(ctx, i, port);
}

static __always_inline int sk_lookup(struct bpf_sk_lookup *ctx, int global)
{
	__u32 slot = lookup_slot;
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	struct config *cfg = get_config(slot);
	if (!cfg)
		return SK_PASS;
	int v4 = ctx->family == AF_INET;
	struct inet_addr remote;
	if (v4)
		remote = v4_addr(LOAD(ctx->remote_ip4));
	else if (ctx->family == AF_INET6 && cfg->capture_ipv6)
		remote = V6_ADDR(ctx->remote_ip6);
	else
		return SK_PASS;
	// The pod's connections to itself are outbound business, decided at connect time; in
	// iptables terms they never traverse nat PREROUTING.
	if (is_local(slot, &remote))
		return SK_PASS;
	// In TPROXY mode so is the proxy's connection from the client's address (sockops wrote
	// it down before its SYN left), which istio's mangle ISTIO_INBOUND returns by its mark.
	if (!cfg->inbound_tunnel_passes) {
		struct transparent_syn syn = {
			.client = remote,
			.pod = v4 ? v4_addr(LOAD(ctx->local_ip4)) : V6_ADDR(ctx->local_ip6),
			.client_port = ctx->remote_port,
			.pod_port = (__u16)ctx->local_port,
		};
		if (bpf_map_lookup_elem(&transparent_syns, &syn)) {
			bpf_map_delete_elem(&transparent_syns, &syn);
			return SK_PASS;
		}
	}

	enum reason r = decide_inbound(slot, cfg, (__u16)ctx->local_port);
	count(slot, r, v4);
	__u8 verdict = TRACE_PASSED;
	if (r == REASON_INBOUND_INCLUDED_PORT) {
		// A bounded loop (Linux 5.3+), not unrolled: unrolling made this the biggest program
		// (16 KiB of kernel memory per pod). The verifier walks every iteration either way.
		verdict = TRACE_DROPPED;
		for (__u32 i = 0; i < LISTENER_SLOTS; i++) {
			__u32 at = slot * LISTENER_SLOTS + i;
			if (global ? try_listener(ctx, at, cfg->inbound_capture_port)
				   : try_listener_static(ctx, at, cfg->inbound_capture_port)) {
				verdict = TRACE_CAPTURED;
				break;
			}
		}
	}
	trace_inbound(ctx, r, verdict, verdict == TRACE_CAPTURED ? cfg->inbound_capture_port : 0);
	if (verdict != TRACE_DROPPED)
		return SK_PASS;
	// Captured but no proxy listening: refuse, as iptables' REDIRECT to a closed port
	// does. Passing would hand the connection to the app behind the proxy's back.
	count_drop(slot, DROP_NO_LISTENER);
	return SK_DROP;
}

SEC("sk_lookup")
int divert_sk_lookup(struct bpf_sk_lookup *ctx) { return sk_lookup(ctx, 1); }

SEC("sk_lookup")
int divert_sk_lookup_static(struct bpf_sk_lookup *ctx) { return sk_lookup(ctx, 0); }
