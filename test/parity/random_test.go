package parity

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testpod"
)

var (
	seedFlag    = flag.Uint64("parity.seed", 0, "seed for TestRandomParity (0: a new one, printed)")
	configsFlag = flag.Int("parity.configs", 20, "random configs in TestRandomParity")
	connsFlag   = flag.Int("parity.conns", 20, "random connections per config in TestRandomParity")
)

// Pools the generator draws from; symbolic like the scenario table.
var (
	portPool        = []string{"80", "81", "8080", "9", "15008"}
	cidrPool        = []string{"{cidrA}/26", "{cidrB}/32", "198.19.0.0/16", "198.18.0.0/24", "127.1.2.0/24", "10.0.0.0/8"}
	idPairs         = [][2]uint32{{appUID, appUID}, {proxyUID, proxyUID}, {appUID, proxyUID}, {2000, 2000}, {proxyUID, 2000}}
	inboundPortPool = []string{"8080", "9090", "15008", "15090", "15001", "7777"}
	dstPool         = []string{"remote:80", "remote:81", "cidrA:80", "cidrB:80", "pod:8080", "pod:15008", "127.0.0.1:8080", "127.0.0.2:8080", "127.1.2.3:8080", "0.0.0.0:8080", "remote:9", "255.255.255.255:80", "224.0.0.1:80", "127.255.255.255:8080"}
)

func pick[T any](r *rand.Rand, pool []T) T { return pool[r.IntN(len(pool))] }

// subset returns a random comma-separated subset of pool, possibly empty.
func subset(r *rand.Rand, pool []string) string {
	var out []string
	for _, p := range pool {
		if r.IntN(4) == 0 {
			out = append(out, p)
		}
	}
	return strings.Join(out, ",")
}

// randomFlags draws a config, its -i and -x from cidrs.
func randomFlags(r *rand.Rand, cidrs []string) []string {
	var f []string
	add := func(flag, v string) { f = append(f, flag, v) }
	if r.IntN(2) == 0 {
		add("-o", subset(r, portPool))
	}
	if r.IntN(2) == 0 {
		add("-q", subset(r, portPool))
	}
	if r.IntN(2) == 0 {
		add("-x", subset(r, cidrs))
	}
	switch r.IntN(3) {
	case 0: // default '*'
	case 1:
		add("-i", "")
	case 2:
		add("-i", subset(r, cidrs))
	}
	if r.IntN(3) == 0 {
		u := pick(r, []string{"1337", "2000"})
		add("-u", u)
		if r.IntN(2) == 0 {
			add("-g", pick(r, []string{"1337", "2000"}))
		}
	}
	if r.IntN(4) == 0 {
		add("-e", "15009")
	}
	switch r.IntN(3) {
	case 0: // default '*'
	case 1:
		add("-b", "")
	case 2:
		add("-b", subset(r, inboundPortPool))
	}
	if r.IntN(2) == 0 {
		add("-d", subset(r, inboundPortPool))
	}
	if r.IntN(4) == 0 {
		add("-p", "16001")
		add("-z", "16006")
	}
	return f
}

// randomScenario draws a connection: inbound to one of pods ("pod", "pod6"), or outbound
// to one of dsts.
func randomScenario(r *rand.Rand, flags []string, i int, pods, dsts []string) scenario {
	if r.IntN(4) == 0 {
		pod := pods[0]
		if len(pods) > 1 { // one pod draws nothing: IPv4 seeds replay as before
			pod = pick(r, pods)
		}
		return scenario{name: fmt.Sprintf("conn %d", i), flags: flags, inbound: true, dst: pod + ":" + pick(r, inboundPortPool)}
	}
	ids := pick(r, idPairs)
	s := scenario{name: fmt.Sprintf("conn %d", i), flags: flags, uid: ids[0], gid: ids[1], dst: pick(r, dsts)}
	// 127.0.0.6, 127.0.0.1 and ::6 are sources on lo: bound to them, only local
	// destinations are routable (for IPv4 the rest is the kernel's EINVAL, which one draw
	// in eight goes to see).
	v6 := strings.Contains(s.dst, "6:") || strings.HasPrefix(s.dst, "[")
	if r.IntN(4) == 0 {
		switch {
		case !v6 && (strings.HasPrefix(s.dst, "pod:") || strings.HasPrefix(s.dst, "127.") || r.IntN(8) == 0):
			s.src = pick(r, []string{"127.0.0.6", "127.0.0.1"})
		case strings.HasPrefix(s.dst, "pod6:") || strings.HasPrefix(s.dst, "[::1]"):
			s.src = "::6"
		}
	}
	switch r.IntN(12) {
	case 0, 1, 2:
		// Java's dual-stack socket: v4-mapped for IPv4, native for IPv6.
		s.v4mapped, s.dual = !v6, v6
	case 3:
		s.mptcp = true
	case 4:
		s.shape.FastOpen = true
	case 5:
		s.shape.IOURing = true
	}
	return s
}

// TestRandomParity draws random valid configs and connections and requires the model and
// every backend to agree. Replay a failure with -parity.seed; `make parity-soak` runs more.
func TestRandomParity(t *testing.T) {
	randomParity(t, "TestRandomParity", backends(), func(t *testing.T) *world { return newWorld(t) },
		func(r *rand.Rand) []string { return randomFlags(r, cidrPool) }, []string{"pod"}, dstPool)
}

// randomParity runs random configs (from flags) and connections (to pods and dsts) in one
// world per backend.
func randomParity(t *testing.T, name string, bs []backend, newWorld func(*testing.T) *world,
	flags func(*rand.Rand) []string, pods, dsts []string) {
	seed := *seedFlag
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (replay: go test ./test/parity -run %s -parity.seed=%d)", seed, name, seed)
	worlds := make([]*world, len(bs))
	for i, b := range bs {
		worlds[i] = newWorld(t)
		// Listeners give no TFO cookies here (the kernel's default), so a drawn TFO connect
		// is the cookie-less kind both backends agree on; with a cookie from the proxy,
		// the first captured TFO connect would arm every later one with it, which is
		// TestDocumentedDifferences' business.
		worlds[i].pod.Sysctl(t, "net/ipv4/tcp_fastopen", "1")
		b.setup(t, worlds[i])
	}
	r := rand.New(rand.NewPCG(seed, seed>>32|1))
	for c := range *configsFlag {
		flags := flags(r)
		var scenarios []scenario
		for i := range *connsFlag {
			scenarios = append(scenarios, randomScenario(r, flags, i, pods, dsts))
		}
		for i, b := range bs {
			w := worlds[i]
			cfg := w.config(t, scenarios[0])
			b.apply(t, w, cfg)
			for _, s := range scenarios {
				conn := w.conn(t, s)
				dial := func() testpod.Result { return w.pod.Dial(t, s.uid, s.gid, s.target(conn))[0] }
				if s.inbound {
					conn = policy.Conn{Direction: policy.Inbound, Dst: conn.Dst, DstLocal: true}
					dial = func() testpod.Result { return w.pod.Net.Dial(t, targetOf(conn))[0] }
				}
				v, want := w.verdictAndOutcome(s, cfg, conn)
				if b.after != nil {
					b.apply(t, w, cfg) // re-reads the counters baseline
				}
				got := observed(dial())
				if got != want {
					t.Errorf("seed %d config %d %s: flags %q, uid %d gid %d src %q -> %s (%s)\n  model (%s): %s\n  %s: %s\n  (%s)",
						seed, c, s.name, w.expand(strings.Join(flags, " ")), s.uid, s.gid, s.src, conn.Dst, s.socket(), v, want, b.name, got, w.health())
				}
				if b.after != nil {
					b.after(t, w, v)
				}
			}
			if t.Failed() {
				t.FailNow()
			}
		}
	}
}
