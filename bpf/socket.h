// What the kernel says about the connecting socket: its owner (the ids xt_owner matches)
// and kernel_fails, the connects the kernel fails whatever the rules.

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
