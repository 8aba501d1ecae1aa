package node

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node/cniapi"
	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testutil"
)

// fuzzAnnotations are the annotations FuzzConfig sets, by bit of its present mask.
var fuzzAnnotations = []string{
	trafficPrefix + "includeOutboundIPRanges",
	trafficPrefix + "excludeOutboundIPRanges",
	trafficPrefix + "includeOutboundPorts",
	trafficPrefix + "excludeOutboundPorts",
	trafficPrefix + "includeInboundPorts",
	trafficPrefix + "excludeInboundPorts",
	AnnotationInterceptionMode,
	AnnotationProxyUID,
	AnnotationProxyGID,
}

// FuzzConfig builds a meshed pod from any annotation values (each present or not), an
// unknown traffic annotation, and the istio-proxy container's runAsUser, and checks what the
// agent would do with it:
//   - accepted: the Config validates, keeps Istio's own inbound exclusions, and round-trips
//     through the CLI's flags (so `divert explain` and the iptables backend see the same);
//     no annotation at all gives the defaults;
//   - refused: one line naming the pod and the annotation (or the proxy's uid/gid from the
//     securityContext) whose value is wrong;
//   - every warning is one line naming an annotation.
func FuzzConfig(f *testing.F) {
	f.Add(uint16(0), "", "", "", "", "", "", "", "", "", "", int64(-2))
	f.Add(uint16(0x1ff), "10.96.0.0/12", "10.96.0.1", "3306", "5432,6379", "8080,9090", "9999", "TPROXY", "2000", "3000", "kubevirtInterfaces", int64(1337))
	f.Add(uint16(0x3), "*", "10.0.0.0/33", "", "", "", "", "", "", "", "", int64(-2))
	f.Add(uint16(0x2), "", "fd00::/8", "", "", "", "", "", "", "", "", int64(-2))
	f.Add(uint16(0x30), "", "", "", "", "*", "15020, 15021", "", "", "", "", int64(-2))
	f.Add(uint16(0x40), "", "", "", "", "", "", "NONE", "", "", "", int64(-2))
	f.Add(uint16(0x180), "", "", "", "", "", "", "", "x", "4294967296", "", int64(-2))
	f.Add(uint16(0x0), "", "", "", "", "", "", "", "", "", "", int64(-1))
	f.Add(uint16(0x8), "", "", "", "3306 5432", "", "", "", "", "", "excludeInterfaces", int64(1000))
	f.Fuzz(func(t *testing.T, present uint16, i, x, q, o, b, d, mode, uid, gid, extra string, runAs int64) {
		values := []string{i, x, q, o, b, d, mode, uid, gid}
		p := &corev1.Pod{}
		p.Name, p.Namespace = "web", "shop"
		p.Annotations = map[string]string{AnnotationIstioStatus: "{}"}
		for bit, k := range fuzzAnnotations {
			if present&(1<<bit) != 0 {
				p.Annotations[k] = values[bit]
			}
		}
		// The API server only stores qualified names as keys (no newline, no space).
		if extra != "" && len(validation.IsQualifiedName(trafficPrefix+extra)) == 0 {
			p.Annotations[trafficPrefix+extra] = "1"
		}
		proxy := corev1.Container{Name: istioProxy}
		if runAs != -2 { // -2: no securityContext
			proxy.SecurityContext = &corev1.SecurityContext{RunAsUser: &runAs}
		}
		p.Spec.Containers = []corev1.Container{{Name: "app"}, proxy}

		cfg, warnings, err := Config(p, policy.Default())
		for _, w := range warnings {
			if strings.Contains(w, "\n") || !strings.Contains(w, "annotation ") {
				t.Fatalf("warning is not one line naming an annotation: %q", w)
			}
		}
		if err != nil {
			msg := err.Error()
			if strings.Contains(msg, "\n") || !strings.Contains(msg, "pod shop/web") {
				t.Fatalf("refusal is not one line naming the pod: %q (annotations %q)", msg, p.Annotations)
			}
			named := strings.Contains(msg, "the proxy's uid") || strings.Contains(msg, "the proxy's gid")
			for k := range p.Annotations {
				named = named || strings.Contains(msg, "annotation "+k+":")
			}
			if !named {
				t.Fatalf("refusal names no annotation: %q (annotations %q)", msg, p.Annotations)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("accepted %q but it does not validate: %v", p.Annotations, err)
		}
		for _, port := range []uint16{15090, 15021, 15020} {
			if !slices.Contains(cfg.InboundExcludePorts, port) {
				t.Fatalf("accepted %q without Istio's inbound exclusion %d: %v", p.Annotations, port, cfg.InboundExcludePorts)
			}
		}
		if present == 0 && extra == "" && runAs == -2 && !reflect.DeepEqual(cfg, policy.Default()) {
			t.Fatalf("no annotations gave %+v, not the defaults", cfg)
		}
		if u, err := strconv.ParseUint(strings.TrimSpace(uid), 10, 32); err == nil && present&(1<<7) != 0 && cfg.ProxyUID != uint32(u) {
			t.Fatalf("annotation %s=%q gave proxy uid %d", AnnotationProxyUID, uid, cfg.ProxyUID)
		}
		fs := pflag.NewFlagSet("again", pflag.ContinueOnError)
		parse := policy.Flags(fs, policy.Default())
		if err := fs.Parse(cfg.Args()); err != nil {
			t.Fatalf("rendered %q does not parse: %v", cfg.Args(), err)
		}
		again, err := parse(func(string) string { return "" })
		if err != nil || !reflect.DeepEqual(again.Args(), cfg.Args()) {
			t.Fatalf("round trip through %q: %v, %q", cfg.Args(), err, again.Args())
		}
	})
}

// FuzzServer sends the agent's CNI socket anything: a whole raw request (bytes as they come,
// HTTP or not), or a body POSTed to the CNI endpoint. The agent has no pods and a private
// state directory, so nothing it could do touches the host. Whatever arrives:
//   - a request it answers is answered with an error (a 4xx, or a JSON Response whose
//     Error is set), unless it is a well-formed DEL (idempotent: nothing to detach);
//   - it keeps serving: a well-formed DEL right after is answered.
func FuzzServer(f *testing.F) {
	for _, s := range []struct {
		raw  bool
		data string
	}{
		{false, `{"command":"DEL"}`},
		{false, `{"command":"DEL","podUid":"../../../etc"}`},
		{false, `{"command":"DEL","podUid":"1f2e-33"}`},
		{false, `{"command":"ADD","podNamespace":"shop","podName":"web","podUid":"1f2e","netns":"/proc/1/ns/net","ips":["fd00::1"]}`},
		{false, `{"command":"CHECK"}`},
		{false, `{"command":`},
		{false, `[]`},
		{false, ``},
		{true, "POST /v1/cni HTTP/1.1\r\nHost: divert\r\nContent-Length: 17\r\n\r\n{\"command\":\"DEL\"}"},
		{true, "GET /v1/cni HTTP/1.1\r\nHost: divert\r\n\r\n"},
		{true, "POST /v1/cni HTTP/1.1\r\nHost: divert\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"},
		{true, "POST /v1/cni HTTP/1.1\r\nHost: divert\r\nContent-Length: 99999999\r\n\r\n{"},
		{true, "\x00\x01\x02garbage\r\n\r\n"},
	} {
		f.Add(s.raw, []byte(s.data))
	}
	// The agent serves root peers only (SO_PEERCRED): as anyone else every request is a 403.
	testutil.RequireRoot(f)
	// Not a bpffs: a DEL with a pod uid is refused ("not a bpffs mount") and nothing is
	// mounted, so a fuzz worker killed by the fuzzer (cleanups do not run) leaves no mount.
	dir := f.TempDir()
	socket := filepath.Join(f.TempDir(), "cni.sock")
	a := &Agent{Client: fake.NewClientset(), NodeName: "node-1", Loader: loader.Options{BPFFS: dir},
		Defaults: policy.Default(), Log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx, socket) }()
	f.Cleanup(func() { cancel(); <-done })
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}

	f.Fuzz(func(t *testing.T, raw bool, data []byte) {
		if raw {
			rawExchange(t, socket, data)
		} else {
			status, body := post(t, socket, data)
			var req Request
			// As the agent reads it: the first JSON value of the body.
			decoded := json.NewDecoder(bytes.NewReader(data)).Decode(&req) == nil
			switch {
			case !decoded && status != http.StatusBadRequest:
				t.Fatalf("body %q is not a request, answered %d %q", data, status, body)
			case decoded:
				var resp Response
				if status != http.StatusOK || json.Unmarshal(body, &resp) != nil {
					t.Fatalf("request %q answered %d %q, not a Response", data, status, body)
				}
				// No pod exists, so only a DEL (idempotent) may succeed.
				if req.Command != "DEL" && resp.Error == "" {
					t.Fatalf("request %q answered without an error: %+v", data, resp)
				}
			}
		}
		// The agent keeps serving.
		resp, err := cniapi.Call(context.Background(), socket, Request{Command: "DEL"})
		if err != nil || resp.Reason != "no pod uid" {
			t.Fatalf("after %q the agent answers %+v, %v", data, resp, err)
		}
	})
}

func dialSocket(t *testing.T, socket string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatalf("dial the agent: %v", err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

// post sends data as the body of a POST to the CNI endpoint and returns the answer.
func post(t *testing.T, socket string, data []byte) (int, []byte) {
	t.Helper()
	c := dialSocket(t, socket)
	defer c.Close()
	req, _ := http.NewRequest(http.MethodPost, "http://divert"+cniapi.Path, bytes.NewReader(data))
	if err := req.Write(c); err != nil {
		t.Fatalf("send: %v", err)
	}
	res, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		t.Fatalf("body %q: no answer: %v", data, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("body %q: read the answer: %v", data, err)
	}
	return res.StatusCode, body
}

// rawExchange writes data as it is, says it is done, and reads what comes back: an answer
// (checked to be an HTTP response, a 200 only with a Response in it) or a close.
func rawExchange(t *testing.T, socket string, data []byte) {
	t.Helper()
	c := dialSocket(t, socket)
	defer c.Close()
	if _, err := c.Write(data); err != nil {
		return // the agent hung up on a request it refused: fine
	}
	c.CloseWrite()
	out, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("raw %q: reading the answer: %v", data, err)
	}
	if len(out) == 0 {
		return
	}
	res, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(out)), nil)
	if err != nil {
		t.Fatalf("raw %q: answered %q, not HTTP: %v", data, out, err)
	}
	defer res.Body.Close()
	if res.StatusCode == http.StatusOK {
		var resp Response
		if err := json.NewDecoder(res.Body).Decode(&resp); err != nil {
			t.Fatalf("raw %q: 200 without a Response: %q", data, out)
		}
	}
}
