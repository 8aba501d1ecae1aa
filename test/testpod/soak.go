package testpod

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshdivert/divert/internal/origdst"
)

// A soak: one pod's app makes many short connections through the proxy at full rate while
// long-lived ones stay open; the proxy reads each original destination only when the app
// asks (a byte on the connection), so the long-lived ones are read after everything else
// has come and gone.

// SoakConfig says how hard to soak.
type SoakConfig struct {
	Short   int // short connections, made at full rate
	Long    int // long-lived connections, held open throughout
	Workers int // app goroutines making the short ones
}

// SoakResult is what the app saw.
type SoakResult struct {
	ShortOK, ShortErrors, ShortLost int
	LongOK, LongErrors, LongLost    int
	Seconds                         float64  // the short connections' run
	Samples                         []string `json:",omitempty"` // the first few failures
}

// Soak is a running soak: Phase waits for the app to reach a phase ("long-open" once the
// long-lived connections are established, where it waits for Continue; "short-done" once
// the short ones are over), Finish closes the long-lived ones and returns the result.
type Soak struct {
	app *Proc
	tb  testing.TB
}

// StartSoak starts a soak proxy on proxyAddr (uid/gid proxyID) and a soak app (appID).
func (p *Pod) StartSoak(tb testing.TB, proxyAddr netip.AddrPort, proxyID, appID uint32, c SoakConfig) *Soak {
	tb.Helper()
	p.Start(tb, ProcSpec{UID: proxyID, GID: proxyID, Args: []string{"soak-proxy", "--listen", proxyAddr.String()}}).WaitReady(tb)
	app := p.Start(tb, ProcSpec{UID: appID, GID: appID, Args: []string{"soak-app",
		"--addrs", addrsArg(p.Net.Addrs), "--short", fmt.Sprint(c.Short),
		"--long", fmt.Sprint(c.Long), "--workers", fmt.Sprint(max(c.Workers, 1))}})
	return &Soak{app: app, tb: tb}
}

// Phase waits until the app has printed the phase line.
func (s *Soak) Phase(phase string, timeout time.Duration) {
	s.tb.Helper()
	s.app.waitStdout(s.tb, phase, timeout, func(out string) bool { return strings.Contains(out, phase+"\n") })
}

// Continue lets the app go on from "long-open" to the short connections.
func (s *Soak) Continue() {
	s.tb.Helper()
	must(s.tb, s.app.Cmd.Process.Signal(syscall.SIGUSR1), "tell the soak app to go on")
}

// Finish has the app read and close its long-lived connections and returns its result.
func (s *Soak) Finish() SoakResult {
	s.tb.Helper()
	must(s.tb, s.app.Cmd.Process.Signal(syscall.SIGUSR1), "tell the soak app to finish")
	out := s.app.Wait(s.tb, 2*time.Minute)
	var res SoakResult
	lines := strings.Split(strings.TrimSpace(out), "\n")
	must(s.tb, json.Unmarshal([]byte(lines[len(lines)-1]), &res), "decode soak result")
	return res
}

// soak-proxy: accept everything; for each connection wait for the app's byte, then read
// the original destination and write it back as a line, and close once the app has.
func runSoakProxy(args []string) error {
	fs := flag.NewFlagSet("soak-proxy", flag.ContinueOnError)
	listenAddr := fs.String("listen", "", "ip:port")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return Serve(*listenAddr, func(c *net.TCPConn) {
		defer c.Close()
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return
		}
		var answer string
		if orig, err := origdst.Get(c); err != nil {
			answer = "err " + errText(err)
		} else {
			answer = orig.String()
		}
		if _, err := io.WriteString(c, answer+"\n"); err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, c) // the app closes first: its port's TIME_WAIT is reusable on loopback
	})
}

// soak-app: open the long-lived connections, make the short ones with workers, then wait
// for SIGUSR1 and ask the long-lived ones last.
func runSoakApp(args []string) error {
	fs := flag.NewFlagSet("soak-app", flag.ContinueOnError)
	var addrs addrsFlag
	fs.Var(&addrs, "addrs", "destination addresses, comma-separated")
	short := fs.Int("short", 0, "short connections")
	long := fs.Int("long", 0, "long-lived connections")
	workers := fs.Int("workers", 4, "goroutines making short connections")
	if err := fs.Parse(args); err != nil {
		return err
	}
	finish := make(chan os.Signal, 1)
	signal.Notify(finish, syscall.SIGUSR1)
	// Destinations cycle over the addresses and 50,000 ports: every connection open at one
	// time has its own.
	const ports = 50000
	dst := func(i int) netip.AddrPort {
		i %= ports * len(addrs)
		return netip.AddrPortFrom(addrs[i%len(addrs)], uint16(1024+i/len(addrs)))
	}
	var res SoakResult
	var mu sync.Mutex
	fail := func(lost bool, long bool, what string) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case long && lost:
			res.LongLost++
		case long:
			res.LongErrors++
		case lost:
			res.ShortLost++
		default:
			res.ShortErrors++
		}
		if len(res.Samples) < 10 {
			res.Samples = append(res.Samples, what)
		}
	}
	ask := func(c net.Conn, want netip.AddrPort, long bool) bool {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte{'q'}); err != nil {
			fail(false, long, fmt.Sprintf("%s: write: %v", want, err))
			return false
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			fail(false, long, fmt.Sprintf("%s: read: %v", want, err))
			return false
		}
		if got := strings.TrimSpace(line); got != want.String() {
			fail(true, long, fmt.Sprintf("%s: proxy read %s", want, got))
			return false
		}
		return true
	}
	d := Dialer(10*time.Second, netip.Addr{})

	longConns := make([]net.Conn, *long)
	for i := range longConns {
		c, err := d.Dial("tcp4", dst(i).String())
		if err != nil {
			return fmt.Errorf("long-lived connection %d: %w", i, err)
		}
		longConns[i] = c
	}
	fmt.Println("long-open")
	<-finish // counted while nothing else is open

	var next, ok atomic.Int64
	next.Store(int64(*long))
	end := int64(*long + *short)
	start := time.Now()
	var wg sync.WaitGroup
	for range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= end {
					return
				}
				want := dst(int(i))
				c, err := d.Dial("tcp4", want.String())
				if err != nil {
					fail(false, false, fmt.Sprintf("%s: dial: %v", want, err))
					continue
				}
				if ask(c, want, false) {
					ok.Add(1)
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.ShortOK = int(ok.Load())
	fmt.Println("short-done")

	<-finish
	for i, c := range longConns {
		if ask(c, dst(i), true) {
			res.LongOK++
		}
		c.Close()
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	fmt.Println(string(b))
	return nil
}
