// TPROXY mode's return path, set up per pod next to the programs.
//
// The proxy forwards an inbound connection to the app from the client's address (Envoy's
// original_src: IP_TRANSPARENT, SO_MARK = the TPROXY mark). The app's SYN-ACK and replies
// go to the client's address, which routes out of the pod; they must come back to the
// proxy's socket over lo instead. istio does it with conntrack (CONNMARK save and restore)
// and a policy route. divert does it without conntrack: with net.ipv4.tcp_fwmark_accept=1
// the app's request and accepted socket take the mark of the SYN that made them
// (inet_request_mark: ir_mark = skb->mark when the listener has no mark; the SYN-ACK is
// routed with ir_mark, and the child socket's sk_mark is ir_mark), so every reply carries
// the proxy's mark and istio's own policy route ("fwmark M lookup T", "local default dev lo
// table T"; with IPv6 capture its ip -6 twin too) delivers it locally. Only SYNs that carry a mark are concerned: from outside
// the pod they arrive with none (a veth clears it), and in the pod only a socket that sets
// SO_MARK (the transparent proxy) makes them.

package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/internal/nsexec"
	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/maps"
	"github.com/meshdivert/divert/policy"
)

const fwmarkAccept = "/proc/sys/net/ipv4/tcp_fwmark_accept"

// wantsReturnPath reports whether the pod needs TPROXY mode's return path: TPROXY mode with
// inbound capture, as istio sets up its policy route.
func wantsReturnPath(cfg *policy.Config, opts Options) bool {
	return cfg.Mode == policy.TProxy && cfg.CapturesInbound() && !opts.NoInbound
}

// syncReturnPath gives the pod's netns the return path when cfg wants it, and removes it
// when cfg does not and the pod had it (had: an update from TPROXY mode). The IPv6 policy
// route goes with IPv6 capture (as istio's); had.v6 says the pod had one. The one setting,
// net.ipv4.tcp_fwmark_accept, serves both families: tcp_conn_request gives an IPv6
// request socket the SYN's mark as well (docs/kernel-facts.md). undo puts back what it
// changed.
func syncReturnPath(netnsPath string, cfg *policy.Config, opts Options, had returnPathState) (undo func() error, err error) {
	want := wantsReturnPath(cfg, opts)
	if !want && !had.on {
		return func() error { return nil }, nil
	}
	routeCfg := cfg
	if !want {
		routeCfg = nil
	}
	prev, err := readFwmarkAccept(netnsPath)
	if err != nil {
		return nil, err
	}
	_, undoRoute, err := iptables.SyncTProxyRoute(netnsPath, routeCfg, policy.IPv4)
	if err != nil {
		return nil, err
	}
	if (want && cfg.IPv6) || had.v6 {
		_, undo6, err := iptables.SyncTProxyRoute(netnsPath, routeCfg, policy.IPv6)
		if err != nil {
			return nil, errors.Join(err, undoRoute())
		}
		undo4 := undoRoute
		undoRoute = func() error { return errors.Join(undo6(), undo4()) }
	}
	next := "0" // the pod had it: divert set it
	if want {
		next = "1"
	}
	if next != prev {
		if err := writeFwmarkAccept(netnsPath, next); err != nil {
			return nil, errors.Join(err, undoRoute())
		}
	}
	return func() error {
		var errs []error
		if next != prev {
			errs = append(errs, writeFwmarkAccept(netnsPath, prev))
		}
		return errors.Join(append(errs, undoRoute())...)
	}, nil
}

// returnPathState is what of the return path a pod has: on, and with it an IPv6 policy
// route (v6).
type returnPathState struct{ on, v6 bool }

// hadReturnPath says whether an attached pod (its pinned maps and links) has the return
// path: the policy its maps hold wants it, and its sk_lookup program is attached.
func hadReturnPath(pinned *maps.Maps, links map[string]link.Link) (returnPathState, error) {
	cfg, _, err := maps.ReadPolicy(pinned)
	if err != nil {
		return returnPathState{}, err
	}
	_, inbound := links["divert_sk_lookup"]
	on := inbound && wantsReturnPath(&cfg, Options{})
	return returnPathState{on: on, v6: on && cfg.IPv6}, nil
}

// removeReturnPath is Detach's part: when the pod's pins say it has the return path, the
// route and the setting in its netns are divert's. The netns is found from the sk_lookup
// link's inode (netnsByInode); when nothing holds it any more, it is gone with what divert
// put there.
func removeReturnPath(dir string) error {
	pinned, err := loadPinnedMaps(dir)
	if err != nil {
		return nil // nothing of a pod's policy to go by: an interrupted attach's leftovers
	}
	l, err := loadPinnedLink(filepath.Join(dir, "link_sk_lookup"))
	if err != nil {
		pinned.Close()
		return nil // outbound only (--no-inbound): no return path was set up
	}
	defer l.Close()
	had, err := hadReturnPath(pinned, map[string]link.Link{"divert_sk_lookup": l})
	pinned.Close()
	if err != nil || !had.on {
		return nil
	}
	info, err := l.Info()
	if err != nil {
		return fmt.Errorf("read sk_lookup link: %w", err)
	}
	ns := info.NetNs()
	if ns == nil || ns.NetnsInode == 0 {
		return nil
	}
	path := netnsByInode(uint64(ns.NetnsInode))
	if path == "" {
		return nil
	}
	if _, _, err := iptables.SyncTProxyRoute(path, nil, policy.IPv4); err != nil {
		return err
	}
	if had.v6 {
		if _, _, err := iptables.SyncTProxyRoute(path, nil, policy.IPv6); err != nil {
			return err
		}
	}
	return writeFwmarkAccept(path, "0")
}

// netnsByInode finds a path to the network namespace with that inode: a bind mount of it
// (iproute2's /run/netns, the container runtime's), else a process in it; "" if none.
func netnsByInode(ino uint64) string {
	want := fmt.Sprintf("net:[%d]", ino)
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			// "36 35 0:4 net:[4026532300] /run/netns/x rw shared:1 - nsfs nsfs rw"
			f := strings.Fields(line)
			if len(f) > 4 && f[3] == want && strings.Contains(line, " - nsfs ") {
				return f[4]
			}
		}
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		path := filepath.Join("/proc", e.Name(), "ns", "net")
		var st unix.Stat_t
		if unix.Stat(path, &st) == nil && st.Ino == ino {
			return path
		}
	}
	return ""
}

func readFwmarkAccept(netnsPath string) (string, error) {
	var v string
	err := nsexec.Do(netnsPath, func() error {
		b, err := os.ReadFile(fwmarkAccept)
		v = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read net.ipv4.tcp_fwmark_accept in netns %s: %w", netnsPath, err)
	}
	return v, nil
}

func writeFwmarkAccept(netnsPath, v string) error {
	err := nsexec.Do(netnsPath, func() error { return os.WriteFile(fwmarkAccept, []byte(v), 0) })
	if err != nil {
		return fmt.Errorf("set net.ipv4.tcp_fwmark_accept=%s in netns %s: %w", v, netnsPath, err)
	}
	return nil
}

// ReturnPathPlan says what Attach adds to the pod's netns for cfg, for dry runs; "" when
// nothing.
func ReturnPathPlan(cfg *policy.Config, opts Options) string {
	if !wantsReturnPath(cfg, opts) {
		return ""
	}
	ip := "ip"
	if cfg.IPv6 {
		ip = "ip and ip -6"
	}
	return fmt.Sprintf("would set net.ipv4.tcp_fwmark_accept=1 and add %s rule fwmark %d lookup %d and route local default dev lo table %d (TPROXY mode's return path)",
		ip, cfg.TProxyMark, cfg.TProxyRouteTable, cfg.TProxyRouteTable)
}
