// The DNS replies: recvmsg4/6 and getpeername4/6 show the app the nameserver it asked,
// never the agent its query went to.

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
