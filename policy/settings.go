package policy

import (
	"fmt"
	"os/user"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// istio-iptables' settings beyond ports, ids and ranges: owner groups, excluded and KubeVirt
// interfaces, the conntrack INVALID drop. Their rule order is Decide's; the methods here are
// what Decide, the iptables rendering and the maps all ask.

// OwnerGroups is istio's owner-group filter of outbound capture, by the group that owns
// the socket (xt_owner --gid-owner: the socket file's fsgid; supplementary groups do not
// count, istio's rules have no --suppl-groups). The zero value captures every group.
type OwnerGroups struct {
	// Only is set when $ISTIO_OUTBOUND_OWNER_GROUPS is a list, not "*": only those groups'
	// outbound connections are captured.
	Only bool
	// Include is that list.
	Include []uint32
	// Exclude ($ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE) are never captured; istio applies it
	// only with "*".
	Exclude []uint32
}

// MaxOwnerGroupsInclude is istio's own limit: the groups share one iptables rule.
const MaxOwnerGroupsInclude = 64

// MaxOwnerGroupsExclude bounds the kernel's set of excluded groups (istio has no limit; one
// rule per group).
const MaxOwnerGroupsExclude = 1024

// OwnerGroupFilter is the filter as istio renders it: only the listed groups are captured
// (only), or the listed groups are not; no groups and !only means no filter.
func (c *Config) OwnerGroupFilter() (only bool, gids []uint32) {
	if c.OutboundOwnerGroups.Only {
		return true, c.OutboundOwnerGroups.Include
	}
	return false, c.OutboundOwnerGroups.Exclude
}

// FiltersOwnerGroups reports whether the owner-group rule exists at all.
func (c *Config) FiltersOwnerGroups() bool {
	only, gids := c.OwnerGroupFilter()
	return only || len(gids) > 0
}

// ownerGroupPasses says whether the owner-group rule lets a connection owned by gid pass,
// and why.
func (c *Config) ownerGroupPasses(gid uint32) (Reason, bool) {
	only, gids := c.OwnerGroupFilter()
	listed := slices.Contains(gids, gid)
	switch {
	case only && !listed:
		return ReasonOwnerGroupNotIncluded, true
	case !only && listed:
		return ReasonOwnerGroupExcluded, true
	}
	return ReasonNone, false
}

// lookupGroup resolves a group name, as iptables does when it reads istio's rules: in the
// /etc/group of the container it runs in. Tests replace it.
var lookupGroup = user.LookupGroup

var gidRange = regexp.MustCompile(`^[0-9]+-[0-9]+$`)

// parseGroups reads istio's group list: numbers or names, comma separated.
func parseGroups(s string, limit int) ([]uint32, error) {
	fields, err := splitList(s)
	if err != nil {
		return nil, err
	}
	if len(fields) > limit {
		return nil, fmt.Errorf("%d groups, at most %d", len(fields), limit)
	}
	var out []uint32
	for _, f := range fields {
		if n, err := strconv.ParseUint(f, 10, 32); err == nil {
			out = append(out, uint32(n))
			continue
		}
		if gidRange.MatchString(f) {
			return nil, fmt.Errorf("%q is a range; list the groups (istio takes names and numbers)", f)
		}
		g, err := lookupGroup(f)
		if err != nil {
			return nil, fmt.Errorf("group %q is not in this container's /etc/group (where iptables would look it up too); give its number", f)
		}
		n, err := strconv.ParseUint(g.Gid, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("group %q has gid %q", f, g.Gid)
		}
		out = append(out, uint32(n))
	}
	return out, nil
}

func parseOwnerGroupsInclude(c *Config, s string) error {
	if s == "*" {
		c.OutboundOwnerGroups.Only, c.OutboundOwnerGroups.Include = false, nil
		return nil
	}
	gids, err := parseGroups(s, MaxOwnerGroupsInclude)
	c.OutboundOwnerGroups.Only, c.OutboundOwnerGroups.Include = true, gids
	return err
}

func ownerGroupsIncludeString(c *Config) string {
	if !c.OutboundOwnerGroups.Only {
		return "*"
	}
	return joinIDs(c.OutboundOwnerGroups.Include)
}

func joinIDs(ids []uint32) string {
	parts := make([]string, len(ids))
	for i, id := range ids {
		parts[i] = itoa(id)
	}
	return strings.Join(parts, ",")
}

// interfaceName is what istio-cni accepts for its interface annotations; iptables takes
// more (a trailing + as a wildcard), which divert refuses rather than half-support.
var interfaceName = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_.\-]*$`)

// parseInterfaces reads a comma-separated list of interface names.
func parseInterfaces(s string) ([]string, error) {
	fields, err := splitList(s)
	if err != nil {
		return nil, err
	}
	for _, f := range fields {
		switch {
		case strings.HasSuffix(f, "+"):
			return nil, fmt.Errorf("%q is an iptables wildcard, which divert does not take; list the interfaces", f)
		case len(f) > 15:
			return nil, fmt.Errorf("interface name %q is longer than 15 characters", f)
		case !interfaceName.MatchString(f):
			return nil, fmt.Errorf("%q is not an interface name (a letter, then letters, digits, '_', '.' or '-')", f)
		}
	}
	return fields, nil
}

// decideInterface is the nat PREROUTING and OUTPUT rules istio puts before its own chains:
// -k's (inserted first, so they win) and -c's. ok is false when none decides.
func (c *Config) decideInterface(conn Conn, udp bool) (Verdict, bool) {
	pass := func(r Reason) (Verdict, bool) { return Verdict{Action: Pass, Reason: r}, true }
	if conn.Direction == Inbound {
		if slices.Contains(c.KubeVirtInterfaces, conn.Iface) {
			// "-i <k> [-d <-i range>] -j ISTIO_REDIRECT", whose REDIRECT is "-p tcp"; then
			// "-i <k> -j RETURN". -x, -o and -q do not apply to it.
			if !udp && c.OutboundCIDRs.Contains(conn.Dst.Addr()) {
				return Verdict{Action: RedirectOutbound, Reason: ReasonVirtualInterface, Port: c.ProxyPort}, true
			}
			return pass(ReasonVirtualInterfaceNotIncluded)
		}
		if slices.Contains(c.ExcludeInterfaces, conn.Iface) {
			return pass(ReasonExcludedInterface)
		}
		return Verdict{}, false
	}
	if slices.Contains(c.ExcludeInterfaces, conn.OutIface()) {
		return pass(ReasonExcludedInterface)
	}
	return Verdict{}, false
}

// OutIface is the interface an outbound connection leaves through: lo for the pod's own
// destinations, else Iface (what routing picks; "" when the caller does not say).
func (conn Conn) OutIface() string {
	if conn.DstLocal {
		return "lo"
	}
	return conn.Iface
}
