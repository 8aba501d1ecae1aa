// divert trace's kernel side: every capture decision (connect, datagram, sk_lookup) can be
// written to one node-wide ring buffer while `divert trace` reads it. Included by divert.c
// after its helpers; divert.c calls trace_outbound or trace_inbound where it counts a
// decision, one line each.
//
// The three maps are node-wide: the first attach pins them under <bpffs>/divert_trace/ and
// every pod's programs are loaded with those (cilium/ebpf MapReplacements), so memory does
// not grow with pods.
//
// Off costs one lookup and a branch: tracing is on only while trace_owner holds a socket,
// which the tracer puts there (a listener of its own). The kernel takes a socket out of a
// sockmap when it closes, and a process's sockets close however it ends, SIGKILL and OOM
// included, so a dead tracer cannot leave tracing on; a flag or a pid in a map could be
// left behind, and the programs cannot ask whether a pid is alive.

#define TRACE_RING_BYTES (256 * 1024)
#define TRACE_WAKEUP_BYTES (TRACE_RING_BYTES / 8)

// What became of a connection.
enum trace_verdict {
	TRACE_PASSED = 1,   // left alone: goes where the app sent it
	TRACE_CAPTURED = 2, // sent to the proxy (or the DNS agent) on to_port
	TRACE_DROPPED = 3,  // refused (inbound captured with no proxy listening)
};
const enum trace_verdict *unused_trace_verdict __attribute__((unused));

struct trace_event {
	__u64 cgroup_id;	     // outbound: the connecting task's cgroup (the pod's or below); 0 inbound
	struct inet_addr src;	     // the source as known at the decision (:: or 0.0.0.0 if unbound;
				     // a TCP connect's comes in the record trace_connected writes)
	struct inet_addr dst;	     // the original destination: where the app (or client) sent it
	__u32 uid;		     // the socket's owner as the rules match it; -1 inbound
	__u32 gid;
	__u16 src_port;		     // host byte order; 0 when not chosen yet (see src)
	__u16 dst_port;		     // host byte order
	__u16 to_port;		     // captured: the port on localhost it went to (inbound: listener's)
	__u8 reason;		     // enum reason
	__u8 verdict;		     // enum trace_verdict
	__u8 protocol;		     // IPPROTO_TCP or IPPROTO_UDP
	__u8 inbound;		     // 1: sk_lookup (from outside the pod), 0: the pod's own connect/send
	__u8 connected;		     // 1: not a decision but the source a TCP connect got (below)
	__u8 pad[5];
	__u64 cookie;		     // outbound: the socket's cookie, which joins the two
};
const struct trace_event *unused_trace_event __attribute__((unused));

// What the tracer wants; the programs skip the rest before touching the ring buffer.
struct trace_control {
	__u64 lost;	// decisions the full ring buffer had no room for
	__u32 verdicts; // a bit (1 << verdict) per verdict wanted; 0: every verdict
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TRACE_RING_BYTES); // ~4,000 decisions in flight, once per node
} trace_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct trace_control);
} trace_control_map SEC(".maps");

// Sizes, not BTF types: the kernel refuses BTF on a sockmap (see inbound_listeners).
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} trace_owner SEC(".maps");

// trace_wanted says whether a tracer runs and wants this verdict. A global function,
// verified once: its callers see one unknown answer rather than walking both of the
// lookups' outcomes on every path that reaches them.
__noinline int trace_wanted(__u32 verdict)
{
	__u32 key = 0;
	struct bpf_sock *owner = bpf_map_lookup_elem(&trace_owner, &key);
	if (!owner)
		return 0; // off: the one lookup
	bpf_sk_release(owner);
	struct trace_control *c = bpf_map_lookup_elem(&trace_control_map, &key);
	return c && (!verdict || !c->verdicts || (c->verdicts & (1 << (verdict & 31))));
}

// trace_submit hands a record to the reader without waking it, unless an eighth of the
// buffer waits: a wakeup is an interrupt (irq_work, an IPI: tens of µs under the VMs here,
// 4x the programs' time per connection when every record woke the reader). The reader
// polls every 100 ms instead, so a record shows within that.
static __always_inline void trace_submit(struct trace_event *e)
{
	__u64 waiting = bpf_ringbuf_query(&trace_events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, waiting >= TRACE_WAKEUP_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

// trace_reserve returns a zeroed event to fill and submit, or 0 (counted in lost).
static __always_inline struct trace_event *trace_reserve(__u8 reason, __u8 verdict)
{
	if (!trace_wanted(verdict))
		return 0;
	struct trace_event *e = bpf_ringbuf_reserve(&trace_events, sizeof(*e), 0);
	if (!e) {
		__u32 key = 0;
		struct trace_control *c = bpf_map_lookup_elem(&trace_control_map, &key);
		if (c)
			__sync_fetch_and_add(&c->lost, 1);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->reason = reason;
	e->verdict = verdict;
	return e;
}

// trace_outbound: a connect or datagram decided by redirect_outbound.
static __always_inline void trace_outbound(struct bpf_sock_addr *ctx, enum reason r,
					   int udp, const struct inet_addr *src, const struct inet_addr *dst,
					   __u16 dport, __u16 to_port)
{
	__u8 verdict = to_port ? TRACE_CAPTURED : TRACE_PASSED;
	struct trace_event *e = trace_reserve(r, verdict);
	if (!e)
		return;
	// The pod by the task's cgroup: connect and sendmsg run in the caller's context, and the
	// programs hold no per-pod id (a field in config would change its layout, which pods
	// attached by an earlier build could then neither report nor update).
	e->cgroup_id = bpf_get_current_cgroup_id();
	__u64 ids = socket_ids(ctx);
	e->uid = (__u32)ids;
	e->gid = ids >> 32;
	e->src = *src;
	e->dst = *dst;
	struct bpf_sock *sk = ctx->sk;
	e->src_port = sk ? (__u16)sk->src_port : 0;
	e->cookie = bpf_get_socket_cookie(ctx);
	// Mark the socket for trace_connected, which cannot look the tracer up (sockops has no
	// bpf_sk_release). The storage outlives nothing: it goes with the socket.
	if (!udp && sk) {
		struct sock_orig_dst *s = bpf_sk_storage_get(&orig_dst_storage, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (s)
			s->traced = 1;
	}
	e->dst_port = dport;
	e->to_port = to_port;
	e->protocol = udp ? IPPROTO_UDP : IPPROTO_TCP;
	trace_submit(e);
}

// trace_inbound: a connection from outside the pod decided by sk_lookup, read from ctx.
// It runs in softirq, where no task is the pod's: the tracer names the pod by the
// destination, one of the pod's own addresses. Static, not global: Linux 5.10 takes no
// sk_lookup context into a global function ("Arg#0 type PTR ... is not supported yet").
static __noinline int trace_inbound(struct bpf_sk_lookup *ctx, __u32 reason, __u32 verdict, __u32 to_port)
{
	struct trace_event *e = trace_reserve(reason, verdict);
	if (!e)
		return 0;
	e->uid = e->gid = (__u32)-1;
	if (ctx->family == AF_INET) {
		e->src = v4_addr(LOAD(ctx->remote_ip4));
		e->dst = v4_addr(LOAD(ctx->local_ip4));
	} else {
		e->src = V6_ADDR(ctx->remote_ip6);
		e->dst = V6_ADDR(ctx->local_ip6);
	}
	e->src_port = bpf_ntohs((__u16)ctx->remote_port);
	e->dst_port = (__u16)ctx->local_port;
	e->to_port = to_port;
	e->protocol = IPPROTO_TCP;
	e->inbound = 1;
	trace_submit(e);
	return 1;
}

// trace_connected: a TCP connect's source, once the kernel has chosen it (sockops
// TCP_CONNECT, after connect4/6 decided and before the SYN leaves), for the tracer to
// complete the decision of the same socket (by cookie) into a whole 5-tuple. Only for a
// socket trace_outbound marked: sockops cannot look the tracer up (no bpf_sk_release
// there), so a connect decided while tracing was on writes this one record even if the
// tracer ended in the microseconds between. A global function, verified once.
__noinline int trace_connected(struct bpf_sock_ops *skops)
{
	if (!skops)
		return 0;
	struct bpf_sock *sk = skops->sk;
	struct sock_orig_dst *s = sk ? bpf_sk_storage_get(&orig_dst_storage, sk, 0, 0) : 0;
	if (!s || !s->traced)
		return 0;
	s->traced = 0;
	struct trace_event *e = bpf_ringbuf_reserve(&trace_events, sizeof(*e), 0);
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	e->connected = 1;
	e->cookie = bpf_get_socket_cookie(skops);
	if (skops->family == AF_INET6)
		e->src = V6_ADDR(skops->local_ip6);
	else
		e->src = v4_addr(LOAD(skops->local_ip4));
	e->src_port = (__u16)skops->local_port;
	e->protocol = IPPROTO_TCP;
	trace_submit(e);
	return 1;
}
