// The constants, enums and structs shared with Go: bpf2go's -type list (bpf/gen.go) turns
// them into package bpf's types, and policy.Reason keeps enum reason's numbers.

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
#define MAX_SLOTS 1024	  /* pods per node with the node's programs, plus one (kubelet allows 110 by default); slot 0 is "not armed" */
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
