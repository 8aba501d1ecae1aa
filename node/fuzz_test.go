package node

import (
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshdivert/divert/policy"
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
