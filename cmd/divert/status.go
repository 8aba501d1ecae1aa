package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

func newStatusCmd(e env) *cobra.Command {
	var id, output, cgroupRoot string
	var opts loader.Options
	cmd := &cobra.Command{
		Use:   "status [--pod-id ID] [-o text|json]",
		Short: "Show attached pods (programs, policy as the kernel holds it, verdict counters) and pods captured by the iptables fallback",
		Args:  cobra.NoArgs,
	}
	cmd.Flags().StringVar(&id, "pod-id", "", "show only this pod")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	cmd.Flags().StringVar(&cgroupRoot, "cgroup-root", "", "the host's cgroup2 mount, or the directory holding it (as the node agent's flag), to look for processes in a pod's netns but outside its cgroup (default: this process's cgroup2 mount)")
	addBPFFSFlag(cmd.Flags(), &opts)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if output != "text" && output != "json" {
			return fmt.Errorf("invalid -o/--output %q: use text or json", output)
		}
		if cgroupRoot == "" {
			cgroupRoot, _ = cgroups.Mountpoint() // "" if none: each pod then says why it was not checked
		} else if m, err := cgroups.RootMount(cgroupRoot, ""); err != nil {
			return fmt.Errorf("invalid --cgroup-root %q: %v; pass the host's cgroup2 mount or the directory holding it", cgroupRoot, err)
		} else {
			cgroupRoot = m.Point // "unified" below it on hybrid hosts
		}
		ids := []string{id}
		if id == "" {
			var err error
			if ids, err = loader.List(opts); err != nil {
				return err
			}
		}
		fallbacks, err := loader.Fallbacks(opts)
		if err != nil {
			return err
		}
		statuses := []*loader.PodStatus{}
		for _, id := range ids {
			st, err := loader.Status(id, opts)
			if errors.Is(err, loader.ErrNotAttached) && fallbacks[id] != "" {
				st, err = &loader.PodStatus{ID: id}, nil
			}
			if err != nil {
				return err
			}
			st.Fallback = fallbacks[id]
			if len(st.Programs) > 0 {
				st.CheckOutsiders("/proc", cgroupRoot)
			}
			delete(fallbacks, id)
			statuses = append(statuses, st)
		}
		// Pods captured by the iptables fallback have no pins, only a marker.
		if id == "" {
			for _, fid := range slices.Sorted(maps.Keys(fallbacks)) {
				statuses = append(statuses, &loader.PodStatus{ID: fid, Fallback: fallbacks[fid]})
			}
		}
		if output == "json" {
			enc := json.NewEncoder(e.stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(statuses)
		}
		if len(statuses) == 0 {
			fmt.Fprintln(e.stdout, "no pods attached")
		}
		for _, st := range statuses {
			printStatus(e.stdout, st)
		}
		return nil
	}
	return cmd
}

// detachedNote is what status prints for a program the kernel detached (gc's help quotes it).
const detachedNote = "detached (its cgroup or netns is gone)"

func printStatus(w io.Writer, st *loader.PodStatus) {
	if st.Fallback != "" && len(st.Programs) == 0 {
		fmt.Fprintf(w, "pod %s: iptables fallback: %s\n", st.ID, st.Fallback)
		return
	}
	p := st.Policy
	id := st.ID
	if st.Pod != "" {
		id += " (" + st.Pod + ")"
	}
	defunct := 0
	for _, prog := range st.Programs {
		if prog.Defunct() {
			defunct++
		}
	}
	switch {
	case defunct > 0:
		fmt.Fprintf(w, "pod %s (defunct: %d of %d programs detached by the kernel; divert gc removes the pins)\n", id, defunct, len(st.Programs))
	case st.Inert:
		fmt.Fprintf(w, "pod %s (inert: nothing captured, an attach or detach was interrupted; run it again)\n", id)
	default:
		fmt.Fprintf(w, "pod %s\n", id)
	}
	fmt.Fprintf(w, "  health   %s\n", st.Health)
	for _, prog := range st.Programs {
		where := fmt.Sprintf("cgroup %d", prog.CgroupID)
		switch {
		case prog.Defunct():
			where = detachedNote
		case prog.NetNSIno != 0:
			where = fmt.Sprintf("netns %d", prog.NetNSIno)
		}
		fmt.Fprintf(w, "  program %-18s %-20s link %d, prog %d, %s\n", prog.Name, prog.Attach, prog.LinkID, prog.ProgramID, where)
	}
	include := strings.Join(p.OutboundCIDRs, ",")
	if p.OutboundIncludeAll {
		include = "*"
	}
	if st.HasProgram("divert_connect4") {
		fmt.Fprintf(w, "  outbound -> :%d  uid %d gid %d bypass; capture -i %q -x %q -q %s -o %s\n",
			p.ProxyPort, p.ProxyUID, p.ProxyGID, include, strings.Join(p.OutboundExcludeCIDRs, ","), ports(p.OutboundPorts), ports(p.OutboundExcludePorts))
	} else {
		fmt.Fprintf(w, "  outbound off (attached with --no-outbound)\n")
	}
	inbound := ports(p.InboundPorts)
	if p.InboundIncludeAll {
		inbound = `"*"`
	}
	if st.Listeners != nil {
		fmt.Fprintf(w, "  inbound  -> :%d  capture -b %s -d %s (tunnel port %d); %d proxy listener(s)\n",
			p.InboundCapturePort, inbound, ports(p.InboundExcludePorts), p.InboundTunnelPort, *st.Listeners)
	} else {
		fmt.Fprintf(w, "  inbound  off (attached with --no-inbound)\n")
	}
	fmt.Fprintf(w, "  pod addresses %v\n", p.LocalAddrs)
	if p.IPv6 {
		fmt.Fprintf(w, "  ipv6     captured (ip6tables' rules: to [::1], passthrough from ::6)\n")
	} else {
		fmt.Fprintf(w, "  ipv6     not captured (IPv4 rules only)\n")
	}
	switch {
	case st.OutsideCgroupUnchecked != "":
		fmt.Fprintf(w, "  outside  not checked for processes in the pod's netns outside its cgroup: %s\n", st.OutsideCgroupUnchecked)
	case len(st.OutsideCgroup) > 0:
		fmt.Fprintf(w, "  outside  pids %v are in the pod's netns but not its cgroup: sockets they make are not captured (docs/security.md)\n", st.OutsideCgroup)
	}
	switch {
	case !p.DNSCapture:
		fmt.Fprintf(w, "  dns      off\n")
	case p.DNSCaptureAll:
		fmt.Fprintf(w, "  dns      -> 127.0.0.1:%d  capture port 53 of every destination (--capture-all-dns)\n", p.DNSAgentPort)
	default:
		fmt.Fprintf(w, "  dns      -> 127.0.0.1:%d  capture port 53 of nameservers %v\n", p.DNSAgentPort, p.DNSServers)
	}
	names := make([]string, 0, len(st.Counters))
	for name := range st.Counters {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if n6 := st.CountersByFamily["ipv6"][name]; n6 > 0 {
			fmt.Fprintf(w, "  %-24s %d (ipv4 %d, ipv6 %d)\n", name, st.Counters[name], st.CountersByFamily["ipv4"][name], n6)
			continue
		}
		fmt.Fprintf(w, "  %-24s %d\n", name, st.Counters[name])
	}
	drops := make([]string, 0, len(st.Drops))
	for name, n := range st.Drops {
		if n > 0 {
			drops = append(drops, fmt.Sprintf("%s %d", name, n))
		}
	}
	slices.Sort(drops)
	if len(drops) == 0 {
		drops = append(drops, "none")
	}
	fmt.Fprintf(w, "  drops: %s\n", strings.Join(drops, ", "))
}

func ports(ps []uint16) string {
	return `"` + strings.Trim(strings.Join(strings.Fields(fmt.Sprint(ps)), ","), "[]") + `"`
}

// reasonNames is every reason, for help texts.
func reasonNames() string {
	var names []string
	for _, r := range policy.Reasons()[1:] {
		names = append(names, r.String())
	}
	return strings.Join(names, ", ")
}
