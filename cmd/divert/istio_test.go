package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/user"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/istioinit"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/policy"
)

// The injector's istio-init command line (after "istio-iptables").
var injectorArgs = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// stubEnv is a machine for istio-iptables mode's flag tests: an IPv4 pod (its addresses
// decide the families), a proxy user that does not exist, and a kernel probe that fails
// the test: these dry runs use --mode iptables or are refused before probing.
func stubEnv(t *testing.T, e env) env {
	e.lookupUser = func(name string) (*user.User, error) { return nil, user.UnknownUserError(name) }
	ie := istioinit.Host()
	ie.Probe = func(loader.Options) error { t.Error("probed the kernel"); return nil }
	ie.PodAddrs = func() ([]net.Addr, error) {
		return []net.Addr{&net.IPNet{IP: net.IPv4(127, 0, 0, 1), Mask: net.CIDRMask(8, 32)}, &net.IPNet{IP: net.IPv4(10, 244, 0, 5), Mask: net.CIDRMask(24, 32)}}, nil
	}
	e.istio = &ie
	return e
}

func runIstio(t *testing.T, vars map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	return runIstioEnv(t, func(e env) env { return e }, vars, args...)
}

// runIstioEnv runs istio-iptables on stubEnv changed by with.
func runIstioEnv(t *testing.T, with func(env) env, vars map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	newCmd := func(e env) *cobra.Command { return newIstioIptablesCmd(with(stubEnv(t, e))) }
	return runCmd(t, newCmd, vars, args...)
}

func runCmd(t *testing.T, newCmd func(env) *cobra.Command, vars map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := newCmd(env2(vars, &out, &errOut))
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err = cmd.ExecuteContext(context.Background())
	return out.String(), errOut.String(), err
}

// Without flags, istio-iptables captures nothing but what its fixed rules do: its own
// defaults, not the injector's.
func TestIstioIptablesDefaults(t *testing.T) {
	out, _, err := runIstio(t, nil, "--mode", "iptables", "-n")
	if err != nil {
		t.Fatal(err)
	}
	def := policy.IstioIptablesDefaults()
	if def.InboundPorts.All || len(def.InboundPorts.Ports) != 0 || def.OutboundCIDRs.All || len(def.OutboundCIDRs.Prefixes) != 0 || len(def.InboundExcludePorts) != 0 {
		t.Fatalf("istio-iptables' defaults capture nothing inbound or by CIDR: %+v", def)
	}
	if want := iptables.Render(&def); !strings.HasSuffix(out, want) {
		t.Fatalf("dry run with no flags should print the rules for istio-iptables' defaults:\n%s\nwant suffix:\n%s", out, want)
	}
	if strings.Contains(out, "-j ISTIO_IN_REDIRECT\n-A OUTPUT") || strings.Contains(out, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT") {
		t.Errorf("no flags must not capture everything:\n%s", out)
	}
}

// The injector's command line gives exactly the injector's policy (policy.Default).
func TestIstioIptablesInjectorLine(t *testing.T) {
	out, _, err := runIstio(t, nil, append([]string{"--mode", "iptables", "-n"}, injectorArgs...)...)
	if err != nil {
		t.Fatal(err)
	}
	def := policy.Default()
	if want := iptables.Render(&def); !strings.HasSuffix(out, want) {
		t.Fatalf("got:\n%s\nwant the rules of policy.Default:\n%s", out, want)
	}
}

// -u defaults to $ENVOY_USER's uid (istio-proxy), as istio-iptables does; -g follows.
func TestIstioIptablesEnvoyUser(t *testing.T) {
	envoy := func(e env) env {
		e.lookupUser = func(name string) (*user.User, error) {
			if name == "envoy" {
				return &user.User{Uid: "2000", Username: name}, nil
			}
			return nil, user.UnknownUserError(name)
		}
		return e
	}
	out, _, err := runIstioEnv(t, envoy, map[string]string{"ENVOY_USER": "envoy"}, "--mode", "iptables", "-n", "-i", "*")
	if err != nil || !strings.Contains(out, "--uid-owner 2000") || !strings.Contains(out, "--gid-owner 2000") {
		t.Fatalf("ENVOY_USER's uid should be the proxy's: %v\n%s", err, out)
	}
	out, _, err = runIstioEnv(t, envoy, map[string]string{"ENVOY_USER": "envoy"}, "--mode", "iptables", "-n", "-u", "3000")
	if err != nil || !strings.Contains(out, "--uid-owner 3000") || !strings.Contains(out, "--gid-owner 3000") {
		t.Fatalf("-u beats ENVOY_USER: %v\n%s", err, out)
	}
	out, _, err = runIstio(t, nil, "--mode", "iptables", "-n")
	if err != nil || !strings.Contains(out, "--uid-owner 1337") {
		t.Fatalf("without the user, 1337: %v\n%s", err, out)
	}
}

// Settings divert does not implement are refused with one line naming them, before
// anything is probed or touched.
func TestIstioIptablesRefuses(t *testing.T) {
	cases := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--redirect-dns", "--resolv-conf", "/nonexistent"}, nil, "--resolv-conf"},
		{nil, map[string]string{"ISTIO_META_DNS_CAPTURE": "on"}, "$ISTIO_META_DNS_CAPTURE"},
		{[]string{"--dual-stack=maybe"}, nil, "--dual-stack"},
		{nil, map[string]string{"ISTIO_DUAL_STACK": "on"}, "$ISTIO_DUAL_STACK"},
		{[]string{"-x", "fd00::/129"}, nil, "-x/--istio-service-exclude-cidr"},
		{[]string{"-i", "::ffff:10.0.0.0/104"}, nil, "-i/--istio-service-cidr"},
		{[]string{"--iptables-trace-logging"}, nil, "--iptables-trace-logging"},
		{[]string{"--cni-mode"}, nil, "--cni-mode"},
		{[]string{"--network-namespace", "/var/run/netns/x"}, nil, "--network-namespace"},
		{nil, map[string]string{"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.0/8"}, "$ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"},
		{nil, map[string]string{"INVALID_DROP": "maybe"}, "$INVALID_DROP"},
		{[]string{"-c", "net+"}, nil, "-c/--istio-exclude-interfaces"},
		{nil, map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "1000-2000"}, "$ISTIO_OUTBOUND_OWNER_GROUPS"},
		{[]string{"-k", "eth1", "-m", "TPROXY"}, nil, "-k/--kube-virt-interfaces with -m TPROXY"},
		{nil, map[string]string{"DRY_RUN": "maybe"}, "$DRY_RUN"},
		{[]string{"--mode", "fast"}, nil, "--mode"},
		{[]string{"--force-iptables-binary", "iptables-foo"}, nil, "--force-iptables-binary"},
		{[]string{"-p", "0"}, nil, "--envoy-port"},
		{[]string{"--no-such-flag"}, nil, "--no-such-flag"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " ")+fmt.Sprint(c.env), func(t *testing.T) {
			out, errOut, err := runIstio(t, c.env, append(c.args, "-n")...)
			if err == nil {
				t.Fatalf("accepted; stdout:\n%s", out)
			}
			if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, c.want) {
				t.Errorf("error should be one line naming %q, got %q", c.want, msg)
			}
			if strings.Contains(out, "would") || errOut != "" {
				t.Errorf("refused input went on: stdout %q stderr %q", out, errOut)
			}
		})
	}
	// The off values are fine, as are the settings divert honours or has no use for.
	for _, args := range [][]string{
		{"--redirect-dns=false", "--dual-stack=false", "-k", "", "-c", ""},
		{"--reconcile", "--force-apply", "--log_output_level=default:info", "--log_as_json"},
	} {
		if _, _, err := runIstio(t, map[string]string{"ISTIO_OUTBOUND_OWNER_GROUPS": "*"}, append(args, "-n", "--mode", "iptables")...); err != nil {
			t.Errorf("%v: %v", args, err)
		}
	}
}

func TestValidateRefusesUncapturedOutbound(t *testing.T) {
	_, _, err := runCmd(t, newValidateCmd, nil, "-i", "10.96.0.0/12", "--outbound", "192.0.2.1:80")
	if err == nil || !strings.Contains(err.Error(), "--outbound") || !strings.Contains(err.Error(), "not-included") {
		t.Fatalf("want --outbound refused with the model's reason, got %v", err)
	}
	var ve validationError
	if errors.As(err, &ve) {
		t.Errorf("bad input is not a validation failure (exit 126)")
	}
}
