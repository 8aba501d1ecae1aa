// The outbound capture decision (policy.Config.Decide's twin; the inbound one is in
// sk_lookup.h) and the programs that apply it to connects and datagrams: connect4/6 and
// sendmsg4/6.

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
