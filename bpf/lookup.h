// What every program asks: addresses of either family, counting, the slot's config and
// port lists, and the lookups by address (global functions, verified once each).

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
