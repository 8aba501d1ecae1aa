package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/spf13/cobra"

	"github.com/meshdivert/divert/bpf"
	"github.com/meshdivert/divert/internal/cgroups"
	"github.com/meshdivert/divert/internal/traceevent"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// traceReady is what trace says on stderr once tracing is on (tests wait for it).
const traceReady = "trace: on"

const traceLong = `trace shows, live, every capture decision divert's programs make on this node: for
each connection (or DNS datagram) a pod makes, and each connection reaching a pod from
outside, which pod, who (uid/gid of the socket), the addresses, what became of it and the
rule that decided it. It answers "why did this connection (not) go to the proxy?".

One line per decision:

  15:04:05.123 pod-a (default/web) outbound tcp 127.0.0.1:48312 -> 10.96.0.10:80 captured included-cidr -> 127.0.0.1:15001 uid 1000 gid 1000
  15:04:05.130 pod-a (default/web) outbound tcp 10.244.0.5:39020 -> 10.0.0.9:5432 passed excluded-outbound-port uid 1000 gid 1000
  15:04:06.001 pod-a (default/web) inbound tcp 10.244.0.9:41234 -> 10.244.0.5:8080 captured inbound-included-port -> :15006

verdict: captured (sent to the proxy, or the DNS agent), passed (left alone), dropped
(refused: inbound captured with no proxy listening). The reason is the rule, named as in
divert status' counters and divert explain (excluded-cidr, proxy-uid, localhost, ...).
The destination is the original one, what the proxy reads with SO_ORIGINAL_DST; the source
is the socket's as the peer sees it (a captured connection's is on 127.0.0.1 or ::1, as the
proxy sees it). A UDP datagram's source port may show as 0: the kernel picks it later.

Tracing is off unless trace runs: the programs then look one map slot up per decision and
write nothing (within the noise in make bench's B8). It goes off when trace ends, however
it ends (Ctrl-C, SIGTERM, SIGKILL). To see the rule behind a reason, divert explain --pod-id
<id> --uid <uid> --dst <ip:port>. One trace at a time per node. Pods attached by
a divert older than trace are not seen (trace names them); attaching them again (the node
agent's restart does) upgrades their programs in place.

Examples:
  divert trace                                  every pod, every decision
  divert trace --pod default/web --verdict passed
                                                why does web's traffic bypass the proxy?
  divert trace --addr 10.96.0.0/12 -o json      connections from or to Service IPs, as JSON
  divert trace --verdict excluded-cidr,dropped  reasons and verdicts mix`

func newTraceCmd(e env) *cobra.Command {
	var pod, output, cgroupRoot string
	var verdicts, addrs []string
	var opts loader.Options
	cmd := &cobra.Command{
		Use:   "trace [--pod ID|NAMESPACE/NAME] [--verdict V,...] [--addr CIDR,...] [-o text|json]",
		Short: "Stream capture decisions live: pod, uid/gid, addresses, verdict and the rule that decided",
		Long:  traceLong,
		Args:  cobra.NoArgs,
	}
	fs := cmd.Flags()
	fs.StringVar(&pod, "pod", "", "only this pod: its pod id (divert status) or Kubernetes namespace/name")
	fs.StringSliceVar(&verdicts, "verdict", nil, "only these verdicts (captured, passed, dropped) or reasons (as divert status names them); repeat or separate with commas")
	fs.StringSliceVar(&addrs, "addr", nil, "only connections from or to these addresses or CIDRs; repeat or separate with commas")
	fs.StringVarP(&output, "output", "o", "text", "output format: text (one line per decision) or json (one object per line)")
	fs.StringVar(&cgroupRoot, "cgroup-root", "", "the host's cgroup2 mount, or the directory holding it, to tell which pod a connecting process is in (default: this process's cgroup2 mount)")
	addBPFFSFlag(fs, &opts)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		f, err := parseTraceFilter(pod, verdicts, addrs, output)
		if err != nil {
			return err
		}
		if cgroupRoot == "" {
			cgroupRoot, _ = cgroups.Mountpoint() // "" if none: outbound decisions then name no pod
		} else if m, err := cgroups.RootMount(cgroupRoot, ""); err != nil {
			return fmt.Errorf("invalid --cgroup-root %q: %v; pass the host's cgroup2 mount or the directory holding it", cgroupRoot, err)
		} else {
			cgroupRoot = m.Point
		}
		return runTrace(cmd.Context(), e, opts, f, newPodIndex(opts, cgroupRoot))
	}
	return cmd
}

// traceFilter is what the user asked to see.
type traceFilter struct {
	pod      string // pod id or namespace/name; "" for all
	verdicts map[bpf.DivertTraceVerdict]bool
	reasons  map[policy.Reason]bool
	prefixes []netip.Prefix
	json     bool
}

func parseTraceFilter(pod string, verdicts, addrs []string, output string) (*traceFilter, error) {
	if output != "text" && output != "json" {
		return nil, fmt.Errorf("invalid -o/--output %q: use text or json", output)
	}
	f := &traceFilter{pod: pod, json: output == "json", verdicts: map[bpf.DivertTraceVerdict]bool{}, reasons: map[policy.Reason]bool{}}
	reasons := map[string]policy.Reason{}
	for _, r := range policy.Reasons() {
		reasons[r.String()] = r
	}
	for _, v := range verdicts {
		if tv, ok := traceevent.Verdicts[v]; ok {
			f.verdicts[tv] = true
		} else if r, ok := reasons[v]; ok && r != policy.ReasonNone {
			f.reasons[r] = true
		} else {
			return nil, fmt.Errorf("invalid --verdict %q: use captured, passed, dropped or a reason as divert status names it (e.g. excluded-cidr)", v)
		}
	}
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			ip, aerr := netip.ParseAddr(a)
			if aerr != nil {
				return nil, fmt.Errorf("invalid --addr %q: use an address (10.0.0.5, fd00::5) or a CIDR (10.96.0.0/12)", a)
			}
			p = netip.PrefixFrom(ip, ip.BitLen())
		}
		f.prefixes = append(f.prefixes, p.Masked())
	}
	return f, nil
}

// kernelVerdicts is what the programs can skip by themselves: with reasons asked for,
// every verdict comes up and the reasons are filtered here.
func (f *traceFilter) kernelVerdicts() []bpf.DivertTraceVerdict {
	if len(f.reasons) > 0 {
		return nil
	}
	var vs []bpf.DivertTraceVerdict
	for v := range f.verdicts {
		vs = append(vs, v)
	}
	return vs
}

// traceEvent is one decision as trace prints it (-o json: one object per line).
type traceEvent struct {
	Time      time.Time `json:"time"`
	Pod       string    `json:"pod,omitempty"`     // the pod id; "" when not known
	PodName   string    `json:"podName,omitempty"` // namespace/name, where the attacher knew it
	Direction string    `json:"direction"`         // outbound (the pod's connect or send), inbound
	Protocol  string    `json:"protocol"`          // tcp, udp
	Src       string    `json:"src"`               // the socket's source, as its peer sees it
	Dst       string    `json:"dst"`               // the original destination
	Verdict   string    `json:"verdict"`           // captured, passed, dropped
	Reason    string    `json:"reason"`            // the rule, as divert status names it
	To        string    `json:"to,omitempty"`      // captured: where it went
	UID       *uint32   `json:"uid,omitempty"`     // outbound: the socket's owner, as the rules match it
	GID       *uint32   `json:"gid,omitempty"`
	CgroupID  uint64    `json:"cgroupId,omitempty"` // outbound: the connecting process's cgroup

	ev traceevent.Event
}

// newTraceEvent is ev, seen at now, as trace prints it.
func newTraceEvent(ev traceevent.Event, now time.Time) *traceEvent {
	out := &traceEvent{Time: now, Direction: ev.Direction(), Protocol: ev.Protocol(), Src: ev.Src.String(), Dst: ev.Dst.String(),
		Verdict: traceevent.VerdictName(ev.Verdict), Reason: ev.Reason.String(), To: ev.To(), CgroupID: ev.CgroupID, ev: ev}
	if !ev.Inbound {
		uid, gid := ev.UID, ev.GID
		out.UID, out.GID = &uid, &gid
	}
	return out
}

// setSource gives a TCP connect's decision the source its socket got (rec, Connected).
func (e *traceEvent) setSource(rec traceevent.Event) {
	e.ev.Src = rec.Src
	e.Src = rec.Src.String()
}

func (f *traceFilter) match(ev *traceEvent, p *tracePod) bool {
	if f.pod != "" && (p == nil || (p.ID != f.pod && p.Name != f.pod)) {
		return false
	}
	if (len(f.verdicts) > 0 || len(f.reasons) > 0) && !f.verdicts[ev.ev.Verdict] && !f.reasons[ev.ev.Reason] {
		return false
	}
	if len(f.prefixes) > 0 && !slices.ContainsFunc(f.prefixes, func(p netip.Prefix) bool {
		return p.Contains(ev.ev.Src.Addr()) || p.Contains(ev.ev.Dst.Addr())
	}) {
		return false
	}
	return true
}

func printTraceEvent(w io.Writer, ev *traceEvent, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(w).Encode(ev)
	}
	pod := ev.Pod
	if pod == "" {
		pod = "?"
	}
	if ev.PodName != "" {
		pod += " (" + ev.PodName + ")"
	}
	_, err := fmt.Fprintf(w, "%s %s %s\n", ev.Time.Format("15:04:05.000"), pod, ev.ev)
	return err
}

// runTrace turns tracing on, prints decisions until ctx ends, and turns it off.
func runTrace(ctx context.Context, e env, opts loader.Options, f *traceFilter, pods *podIndex) error {
	if err := pods.refresh(true); err != nil {
		return err
	}
	if f.pod != "" && pods.byIDOrName(f.pod) == nil {
		return fmt.Errorf("invalid --pod %q: no pod attached under %s has that id or namespace/name; divert status lists them", f.pod, opts.BPFFS)
	}
	t, err := loader.StartTrace(opts, f.kernelVerdicts())
	if errors.Is(err, loader.ErrTraceBusy) {
		return fmt.Errorf("trace: %w; only one trace at a time (stop the other first)", err)
	}
	if err != nil {
		return err
	}
	defer t.Close()
	rd, err := ringbuf.NewReader(t.Events)
	if err != nil {
		return fmt.Errorf("trace: read the ring buffer: %w", err)
	}
	defer rd.Close()
	if err := pods.refresh(true); err != nil { // the node's maps exist now: who writes to them
		return err
	}
	for _, p := range pods.unseen() {
		fmt.Fprintf(e.stderr, "trace: pod %s not seen: attached by a divert older than trace; attach it again to see it\n", p)
	}
	fmt.Fprintln(e.stderr, traceReady)

	emit := func(ev *traceEvent) error {
		p := pods.lookup(ev)
		if p != nil {
			ev.Pod, ev.PodName = p.ID, p.Name
		}
		if !f.match(ev, p) {
			return nil
		}
		return printTraceEvent(e.stdout, ev, f.json)
	}
	// A TCP connect is decided before the kernel picks its source: the decision waits
	// (briefly) for the record sockops writes once it has, to show the whole 5-tuple.
	pending := map[uint64]*traceEvent{}
	flush := func(all bool) error {
		for c, ev := range pending {
			if all || time.Since(ev.Time) > 200*time.Millisecond {
				delete(pending, c)
				if err := emit(ev); err != nil {
					return err
				}
			}
		}
		return nil
	}
	defer flush(true)

	var lost uint64
	var rec ringbuf.Record
	for ctx.Err() == nil {
		if err := flush(false); err != nil {
			return err
		}
		// The programs do not wake the reader per record (bpf/trace.h): poll.
		rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
		err := rd.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if n, err := t.Lost(); err == nil && n > lost {
				fmt.Fprintf(e.stderr, "trace: %d decisions lost (the ring buffer was full); narrow the filters\n", n-lost)
				lost = n
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("trace: read the ring buffer: %w", err)
		}
		ev, err := traceevent.Decode(rec.RawSample)
		if err != nil {
			return err
		}
		switch d := pending[ev.Cookie]; {
		case ev.Connected && d != nil:
			delete(pending, ev.Cookie)
			d.setSource(ev)
			err = emit(d)
		case ev.Connected: // its decision was filtered out, or came before trace
		case ev.AwaitsSource():
			pending[ev.Cookie] = newTraceEvent(ev, time.Now())
		default:
			err = emit(newTraceEvent(ev, time.Now()))
		}
		if err != nil {
			return err
		}
	}
	return t.Close()
}
