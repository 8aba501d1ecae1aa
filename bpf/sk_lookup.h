// Inbound: sk_lookup hands connections to included ports to the proxy's inbound
// listener, without NAT (the accepted socket's local address is the original destination).

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
