package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// The DNS side of the test images: a stand-in for istio-agent's DNS proxy, and a client
// that says who answered.

const (
	// agentListen is where istio-agent serves DNS when ISTIO_META_DNS_CAPTURE is on, and
	// where captured queries are sent.
	agentListen = "127.0.0.1:15053"
	// probeName is answered by the agent itself with probeAgent (istio-agent answers the
	// names it knows, ServiceEntry hosts, itself) and by CoreDNS with another address
	// (test/k8s/e2e/cluster: DNSProbeName, DNSProbeCoreDNS): the answer says who answered.
	probeName  = "whoami.divert.test."
	probeAgent = "192.0.2.15"
	dnsTimeout = 3 * time.Second
)

// dnsCaptureOn reads ISTIO_META_DNS_CAPTURE as istio-agent does: the agent serves DNS only
// when it is true.
func dnsCaptureOn() bool {
	v := strings.ToLower(strings.TrimSpace(os.Getenv("ISTIO_META_DNS_CAPTURE")))
	return v == "true" || v == "1"
}

// agentLog is one line per query the agent handled, in the container's log.
type agentLog struct {
	Agent    string `json:"agent"`
	Net      string `json:"net"`
	Client   string `json:"client"`
	Name     string `json:"name"`
	Answered string `json:"answered"` // "agent", or "upstream <nameserver>"
	Err      string `json:"err,omitempty"`
}

var logMu sync.Mutex

func (l agentLog) write() {
	b, _ := json.Marshal(l)
	logMu.Lock()
	defer logMu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}

// startDNSAgent listens on 127.0.0.1:15053 (UDP and TCP) before returning, then serves in
// the background: the probe name itself, everything else forwarded to the pod's first
// nameserver (CoreDNS), as this process's uid. That is the proxy's uid, which DNS capture
// must leave alone, or the forwarded query would come straight back here.
func startDNSAgent(name string) error {
	upstream, err := nameserver()
	if err != nil {
		return err
	}
	pc, err := net.ListenPacket("udp4", agentListen)
	if err != nil {
		return err
	}
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp4", agentListen)
	if err != nil {
		return err
	}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := append([]byte(nil), buf[:n]...)
			go func() {
				l := agentLog{Agent: name, Net: "udp", Client: from.String()}
				if resp := l.handle(q, upstream, exchangeUDP); resp != nil {
					_, _ = pc.WriteTo(resp, from)
				}
				l.write()
			}()
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(2 * dnsTimeout))
				l := agentLog{Agent: name, Net: "tcp", Client: c.RemoteAddr().String()}
				q, err := readTCPMsg(c)
				if err != nil {
					l.Err = err.Error()
				} else if resp := l.handle(q, upstream, exchangeTCP); resp != nil {
					_ = writeTCPMsg(c, resp)
				}
				l.write()
			}()
		}
	}()
	return nil
}

// handle answers q itself or through upstream, and notes what it did.
func (l *agentLog) handle(q []byte, upstream netip.AddrPort, exchange func([]byte, netip.AddrPort) ([]byte, error)) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		l.Err = err.Error()
		return nil
	}
	question, err := p.Question()
	if err != nil {
		l.Err = err.Error()
		return nil
	}
	l.Name = question.Name.String()
	if strings.EqualFold(l.Name, probeName) && question.Type == dnsmessage.TypeA {
		l.Answered = "agent"
		resp, err := answerA(h.ID, question, netip.MustParseAddr(probeAgent))
		if err != nil {
			l.Err = err.Error()
		}
		return resp
	}
	l.Answered = "upstream " + upstream.String()
	resp, err := exchange(q, upstream)
	if err != nil {
		l.Err = err.Error()
		return nil
	}
	return resp
}

func answerA(id uint16, q dnsmessage.Question, a netip.Addr) ([]byte, error) {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, Response: true, Authoritative: true, RecursionAvailable: true})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	if err := b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: a.As4()}); err != nil {
		return nil, err
	}
	return b.Finish()
}

func exchangeUDP(q []byte, server netip.AddrPort) ([]byte, error) {
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(server))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(dnsTimeout))
	if _, err := c.Write(q); err != nil {
		return nil, err
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

func exchangeTCP(q []byte, server netip.AddrPort) ([]byte, error) {
	d := net.Dialer{Timeout: dnsTimeout}
	d.SetMultipathTCP(false)
	c, err := d.Dial("tcp4", server.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(dnsTimeout))
	if err := writeTCPMsg(c, q); err != nil {
		return nil, err
	}
	return readTCPMsg(c)
}

// DNS over TCP: each message after its two-byte length.
func readTCPMsg(r io.Reader) ([]byte, error) {
	var n uint16
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return nil, err
	}
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	return b, err
}

func writeTCPMsg(w io.Writer, m []byte) error {
	_, err := w.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...))
	return err
}

// nameserver is the first nameserver of the pod's /etc/resolv.conf (the kubelet writes the
// cluster DNS Service's address there), on port 53.
func nameserver() (netip.AddrPort, error) {
	f, err := os.Open("/etc/resolv.conf")
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "nameserver" {
			a, err := netip.ParseAddr(f[1])
			if err != nil {
				return netip.AddrPort{}, fmt.Errorf("/etc/resolv.conf: nameserver %q: %w", f[1], err)
			}
			return netip.AddrPortFrom(a, 53), nil
		}
	}
	return netip.AddrPort{}, errors.New("/etc/resolv.conf names no nameserver")
}

// dnsResult is what the dns command prints.
type dnsResult struct {
	Kind   string `json:"kind"`
	Name   string `json:"name"`
	Server string `json:"server,omitempty"` // the nameserver asked (resolv.conf's)
	From   string `json:"from,omitempty"`   // udp: the reply's source address (recvfrom)
	Peer   string `json:"peer,omitempty"`   // tcp: getpeername()
	// Via names what the TCP query went through before the nameserver's answer: the test
	// proxies' JSON hop lines, which a meshed pod's TCP query to port 53 without DNS capture
	// meets (it is captured to the proxy like any TCP connection, as under istio's rules).
	Via     []string `json:"via,omitempty"`
	Answers []string `json:"answers,omitempty"`
	RCode   string   `json:"rcode,omitempty"`
	Err     string   `json:"err,omitempty"`
}

// runDNS: dns --kind go|udp|tcp NAME. go is Go's pure resolver as a program uses it
// (resolv.conf's nameserver, search list and ndots; A and AAAA); udp asks the nameserver
// for NAME's A record from an unconnected socket and reports the reply's source, as dig
// does (a resolver drops a reply from another address); tcp asks over TCP and reports the
// connection's peer.
func runDNS(args []string) error {
	fs := flag.NewFlagSet("dns", flag.ContinueOnError)
	kind := fs.String("kind", "go", "go | udp | tcp")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: dns --kind go|udp|tcp NAME")
	}
	r := dnsResult{Kind: *kind, Name: fs.Arg(0)}
	r.query()
	return json.NewEncoder(os.Stdout).Encode(r)
}

func (r *dnsResult) query() {
	fail := func(err error) { r.Err = err.Error() }
	if r.Kind == "go" {
		ctx, cancel := context.WithTimeout(context.Background(), 2*dnsTimeout)
		defer cancel()
		addrs, err := (&net.Resolver{PreferGo: true}).LookupHost(ctx, r.Name)
		if err != nil {
			fail(err)
		}
		r.Answers = addrs
		return
	}
	server, err := nameserver()
	if err != nil {
		fail(err)
		return
	}
	r.Server = server.String()
	name, err := dnsmessage.NewName(strings.TrimSuffix(r.Name, ".") + ".")
	if err != nil {
		fail(err)
		return
	}
	id := uint16(time.Now().UnixNano())
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	_ = b.StartQuestions()
	_ = b.Question(dnsmessage.Question{Name: name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	q, err := b.Finish()
	if err != nil {
		fail(err)
		return
	}
	var resp []byte
	switch r.Kind {
	case "udp":
		pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
		if err != nil {
			fail(err)
			return
		}
		defer pc.Close()
		_ = pc.SetDeadline(time.Now().Add(dnsTimeout))
		if _, err := pc.WriteTo(q, net.UDPAddrFromAddrPort(server)); err != nil {
			fail(err)
			return
		}
		buf := make([]byte, 1500)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			fail(err)
			return
		}
		r.From, resp = from.String(), buf[:n]
	case "tcp":
		d := net.Dialer{Timeout: dnsTimeout}
		d.SetMultipathTCP(false)
		c, err := d.Dial("tcp4", server.String())
		if err != nil {
			fail(err)
			return
		}
		defer c.Close()
		r.Peer = c.RemoteAddr().String()
		_ = c.SetDeadline(time.Now().Add(dnsTimeout))
		if err := writeTCPMsg(c, q); err != nil {
			fail(err)
			return
		}
		br := bufio.NewReader(c)
		// A DNS message's length never starts with '{' (it would be over 31,000 bytes).
		for {
			b, err := br.Peek(1)
			if err != nil || b[0] != '{' {
				break
			}
			line, err := br.ReadBytes('\n')
			if err != nil {
				fail(err)
				return
			}
			var hop struct{ Who, Orig string }
			if err := json.Unmarshal(line, &hop); err != nil {
				fail(fmt.Errorf("garbled hop line %q", line))
				return
			}
			r.Via = append(r.Via, hop.Who+" (orig "+hop.Orig+")")
		}
		if resp, err = readTCPMsg(br); err != nil {
			fail(err)
			return
		}
	default:
		fail(fmt.Errorf("unknown --kind %q", r.Kind))
		return
	}
	r.parse(resp, id)
}

// parse keeps the response's rcode and A records; the ID must be the query's.
func (r *dnsResult) parse(resp []byte, id uint16) {
	var p dnsmessage.Parser
	h, err := p.Start(resp)
	if err != nil {
		r.Err = err.Error()
		return
	}
	if h.ID != id {
		r.Err = fmt.Sprintf("response ID %d, query ID %d", h.ID, id)
		return
	}
	r.RCode = h.RCode.String()
	if err := p.SkipAllQuestions(); err != nil {
		r.Err = err.Error()
		return
	}
	for {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			return
		}
		if err != nil {
			r.Err = err.Error()
			return
		}
		if rh.Type != dnsmessage.TypeA {
			_ = p.SkipAnswer()
			continue
		}
		a, err := p.AResource()
		if err != nil {
			r.Err = err.Error()
			return
		}
		r.Answers = append(r.Answers, netip.AddrFrom4(a.A).String())
	}
}
