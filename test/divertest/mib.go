package divertest

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/meshdivert/divert/internal/nsexec"
)

// TCPStats are a network namespace's TCP MIB counters ("Tcp.RetransSegs",
// "TcpExt.ListenDrops", ...): what the kernel did to connections that a decision counter
// alone cannot tell (a SYN dropped and retransmitted, a syncookie).
type TCPStats map[string]uint64

// ReadTCPStats reads the TCP MIB counters of the network namespace at path.
func ReadTCPStats(tb testing.TB, netnsPath string) TCPStats {
	tb.Helper()
	s := TCPStats{}
	err := nsexec.Do(netnsPath, func() error {
		// thread-self: /proc/net is /proc/self/net, the netns of the process's main
		// thread, not of this one.
		for _, f := range []string{"/proc/thread-self/net/netstat", "/proc/thread-self/net/snmp"} {
			if err := readMIB(f, s); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("read TCP counters of %s: %v", netnsPath, err)
	}
	return s
}

// readMIB reads the Tcp and TcpExt lines of a /proc/net/{snmp,netstat} file: pairs of a
// header line and a value line with the same prefix.
func readMIB(path string, into TCPStats) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var header []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || (fields[0] != "Tcp:" && fields[0] != "TcpExt:") {
			continue
		}
		if header == nil || header[0] != fields[0] {
			header = fields
			continue
		}
		prefix := strings.TrimSuffix(fields[0], ":")
		for i := 1; i < len(fields) && i < len(header); i++ {
			// Tcp.MaxConn is -1: signed, and no counter anyway.
			if n, err := strconv.ParseUint(fields[i], 10, 64); err == nil {
				into[prefix+"."+header[i]] = n
			}
		}
		header = nil
	}
	return sc.Err()
}

// Since lists the counters that changed from before to s, "name +delta", sorted.
func (s TCPStats) Since(before TCPStats) string {
	var out []string
	for k, v := range s {
		if v != before[k] {
			out = append(out, fmt.Sprintf("%s +%d", k, int64(v-before[k])))
		}
	}
	if len(out) == 0 {
		return "none changed"
	}
	slices.Sort(out)
	return strings.Join(out, ", ")
}
