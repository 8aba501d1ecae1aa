// The original destination's way to the proxy: sockops carries it as a TCP option and
// finds the proxy's listeners; getsockopt answers SO_ORIGINAL_DST from it.

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
