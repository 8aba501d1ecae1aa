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

// Its parts, each a header saying what it owns, in the order that compiles them as one file
// did (the programs are the same instructions): shared types, maps, helpers, then programs.
#include "types.h"
#include "maps.h"
#include "lookup.h"
#include "socket.h"
#include "trace.h"
#include "outbound.h"
#include "dns.h"
#include "sockops.h"
#include "sk_lookup.h"
