package policy_test

import (
	"io"
	"net/netip"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"

	"github.com/meshdivert/divert/policy"
)

// parse runs an istio-iptables command line (and environment) through policy.Flags with
// Default() as the defaults, the way the divert commands do.
func parse(args []string, env map[string]string) (policy.Config, error) {
	fs := pflag.NewFlagSet("istio-iptables", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	build := policy.Flags(fs, policy.Default())
	if err := fs.Parse(args); err != nil {
		return policy.Config{}, err
	}
	return build(func(k string) string { return env[k] })
}

func mustParse(t *testing.T, args ...string) policy.Config {
	t.Helper()
	cfg, err := parse(args, nil)
	require.NoError(t, err, "args %q", args)
	return cfg
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

func TestEnvVarNames(t *testing.T) {
	for flag, env := range map[string]string{
		policy.FlagProxyPort:            "ENVOY_PORT",
		policy.FlagInboundCapturePort:   "INBOUND_CAPTURE_PORT",
		policy.FlagInboundTunnelPort:    "INBOUND_TUNNEL_PORT",
		policy.FlagProxyUID:             "PROXY_UID",
		policy.FlagProxyGID:             "PROXY_GID",
		policy.FlagMode:                 "ISTIO_INBOUND_INTERCEPTION_MODE",
		policy.FlagTProxyMark:           "ISTIO_INBOUND_TPROXY_MARK",
		policy.FlagTProxyRouteTable:     "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
		policy.FlagInboundPorts:         "ISTIO_INBOUND_PORTS",
		policy.FlagInboundExcludePorts:  "ISTIO_LOCAL_EXCLUDE_PORTS",
		policy.FlagOutboundPorts:        "ISTIO_OUTBOUND_PORTS",
		policy.FlagOutboundExcludePorts: "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
		policy.FlagOutboundCIDRs:        "ISTIO_SERVICE_CIDR",
		policy.FlagOutboundExcludeCIDRs: "ISTIO_SERVICE_EXCLUDE_CIDR",
	} {
		require.Equal(t, env, policy.EnvVar(flag), flag)
	}
}

// TestFlagsRegistered checks every flag has istio-iptables' short letter and that the help
// text names its environment variable.
func TestFlagsRegistered(t *testing.T) {
	fs := pflag.NewFlagSet("istio-iptables", pflag.ContinueOnError)
	policy.Flags(fs, policy.Default())
	for name, short := range map[string]string{
		policy.FlagProxyPort:            "p",
		policy.FlagInboundCapturePort:   "z",
		policy.FlagInboundTunnelPort:    "e",
		policy.FlagProxyUID:             "u",
		policy.FlagProxyGID:             "g",
		policy.FlagMode:                 "m",
		policy.FlagTProxyMark:           "t",
		policy.FlagTProxyRouteTable:     "r",
		policy.FlagInboundPorts:         "b",
		policy.FlagInboundExcludePorts:  "d",
		policy.FlagOutboundPorts:        "q",
		policy.FlagOutboundExcludePorts: "o",
		policy.FlagOutboundCIDRs:        "i",
		policy.FlagOutboundExcludeCIDRs: "x",
	} {
		f := fs.Lookup(name)
		require.NotNil(t, f, "flag --%s not registered", name)
		require.Equal(t, short, f.Shorthand, "--%s", name)
		require.Contains(t, f.Usage, policy.EnvVar(name), "--%s usage", name)
	}
}

func TestFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want func(c *policy.Config) // applied to Default()
	}{
		{name: "nothing given is Default"},
		{
			name: "the reference command line is Default",
			args: []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"},
		},

		// Ports, short and long.
		{name: "-p", args: []string{"-p", "15101"}, want: func(c *policy.Config) { c.ProxyPort = 15101 }},
		{name: "--envoy-port", args: []string{"--envoy-port=15101"}, want: func(c *policy.Config) { c.ProxyPort = 15101 }},
		{name: "-z", args: []string{"-z", "15106"}, want: func(c *policy.Config) { c.InboundCapturePort = 15106 }},
		{name: "--inbound-capture-port", args: []string{"--inbound-capture-port", "15106"}, want: func(c *policy.Config) { c.InboundCapturePort = 15106 }},
		{name: "-e", args: []string{"-e", "15009"}, want: func(c *policy.Config) { c.InboundTunnelPort = 15009 }},
		{name: "--inbound-tunnel-port", args: []string{"--inbound-tunnel-port=15009"}, want: func(c *policy.Config) { c.InboundTunnelPort = 15009 }},
		{name: "port 65535", args: []string{"-p", "65535"}, want: func(c *policy.Config) { c.ProxyPort = 65535 }},

		// uid / gid.
		{name: "-u sets the gid too", args: []string{"-u", "1000"}, want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 1000, 1000 }},
		{name: "--proxy-uid sets the gid too", args: []string{"--proxy-uid", "0"}, want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 0, 0 }},
		{name: "-u and -g", args: []string{"-u", "1000", "-g", "2000"}, want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 1000, 2000 }},
		{name: "-g before -u", args: []string{"--proxy-gid", "2000", "--proxy-uid", "1000"}, want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 1000, 2000 }},
		{name: "-g alone", args: []string{"-g", "2000"}, want: func(c *policy.Config) { c.ProxyGID = 2000 }},
		{name: "env PROXY_UID sets the gid too", env: map[string]string{"PROXY_UID": "1000"}, want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 1000, 1000 }},
		{
			name: "env PROXY_UID and PROXY_GID",
			env:  map[string]string{"PROXY_UID": "1000", "PROXY_GID": "3000"},
			want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 1000, 3000 },
		},
		{
			name: "-u flag and env PROXY_GID",
			args: []string{"-u", "1000"},
			env:  map[string]string{"PROXY_GID": "3000"},
			want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 1000, 3000 },
		},
		{
			name: "-u flag beats env PROXY_UID, gid follows the flag",
			args: []string{"-u", "1000"},
			env:  map[string]string{"PROXY_UID": "4000"},
			want: func(c *policy.Config) { c.ProxyUID, c.ProxyGID = 1000, 1000 },
		},

		// Mode and TPROXY settings.
		{name: "-m TPROXY", args: []string{"-m", "TPROXY"}, want: func(c *policy.Config) { c.Mode = policy.TProxy }},
		{name: "--istio-inbound-interception-mode tproxy", args: []string{"--istio-inbound-interception-mode", "tproxy"}, want: func(c *policy.Config) { c.Mode = policy.TProxy }},
		{name: "-m REDIRECT", args: []string{"-m", "REDIRECT"}},
		{name: "-t -r", args: []string{"-t", "1338", "-r", "134"}, want: func(c *policy.Config) { c.TProxyMark, c.TProxyRouteTable = 1338, 134 }},
		{
			name: "--istio-inbound-tproxy-mark --istio-inbound-tproxy-route-table",
			args: []string{"--istio-inbound-tproxy-mark=7", "--istio-inbound-tproxy-route-table=8"},
			want: func(c *policy.Config) { c.TProxyMark, c.TProxyRouteTable = 7, 8 },
		},

		// Inbound ports: "*", "" and lists.
		{name: "-b *", args: []string{"-b", "*"}},
		{name: `-b ""`, args: []string{"-b", ""}, want: func(c *policy.Config) { c.InboundPorts = policy.PortList{} }},
		{name: "-b list", args: []string{"-b", "80,443"}, want: func(c *policy.Config) { c.InboundPorts = policy.PortList{Ports: []uint16{80, 443}} }},
		{
			name: "--istio-inbound-ports list with spaces",
			args: []string{"--istio-inbound-ports= 80, 443 ,"},
			want: func(c *policy.Config) { c.InboundPorts = policy.PortList{Ports: []uint16{80, 443}} },
		},
		{name: "-d", args: []string{"-d", "9000"}, want: func(c *policy.Config) { c.InboundExcludePorts = []uint16{9000} }},
		{name: `--istio-local-exclude-ports ""`, args: []string{"--istio-local-exclude-ports", ""}, want: func(c *policy.Config) { c.InboundExcludePorts = nil }},

		// Outbound ports.
		{name: "-q", args: []string{"-q", "3306,5432"}, want: func(c *policy.Config) { c.OutboundPorts = []uint16{3306, 5432} }},
		{name: "--istio-outbound-ports", args: []string{"--istio-outbound-ports", "3306"}, want: func(c *policy.Config) { c.OutboundPorts = []uint16{3306} }},
		{name: "-o", args: []string{"-o", "22,25"}, want: func(c *policy.Config) { c.OutboundExcludePorts = []uint16{22, 25} }},
		{name: "--istio-local-outbound-ports-exclude", args: []string{"--istio-local-outbound-ports-exclude=22"}, want: func(c *policy.Config) { c.OutboundExcludePorts = []uint16{22} }},

		// Outbound CIDRs: "*", "", lists, masking, bare IPs, IPv6.
		{name: "-i *", args: []string{"-i", "*"}},
		{name: `-i ""`, args: []string{"-i", ""}, want: func(c *policy.Config) { c.OutboundCIDRs = policy.CIDRList{} }},
		{
			name: "-i list is masked",
			args: []string{"-i", "10.1.2.3/8,192.168.7.0/16"},
			want: func(c *policy.Config) {
				c.OutboundCIDRs = policy.CIDRList{Prefixes: prefixes("10.0.0.0/8", "192.168.0.0/16")}
			},
		},
		{
			name: "--istio-service-cidr bare IP is /32",
			args: []string{"--istio-service-cidr", "10.96.0.10"},
			want: func(c *policy.Config) { c.OutboundCIDRs = policy.CIDRList{Prefixes: prefixes("10.96.0.10/32")} },
		},
		{
			name: "-x masked and bare",
			args: []string{"-x", "169.254.169.254, 10.96.3.4/12"},
			want: func(c *policy.Config) {
				c.OutboundExcludeCIDRs = prefixes("169.254.169.254/32", "10.96.0.0/12")
			},
		},
		// Lists: commas separate, spaces around an item are trimmed (istio's rules take
		// " 15021" as 15021 too).
		{name: "-d with spaces after commas", args: []string{"-d", "15090, 15021"}, want: func(c *policy.Config) { c.InboundExcludePorts = []uint16{15090, 15021} }},
		{name: "-o with spaces after commas", args: []string{"-o", "3306, 5432"}, want: func(c *policy.Config) { c.OutboundExcludePorts = []uint16{3306, 5432} }},
		{name: `--istio-service-exclude-cidr ""`, args: []string{"--istio-service-exclude-cidr", ""}},

		// Environment: applies only when the flag is not given.
		{name: "env ENVOY_PORT", env: map[string]string{"ENVOY_PORT": "15101"}, want: func(c *policy.Config) { c.ProxyPort = 15101 }},
		{
			name: "-p beats env ENVOY_PORT",
			args: []string{"-p", "15201"},
			env:  map[string]string{"ENVOY_PORT": "15101"},
			want: func(c *policy.Config) { c.ProxyPort = 15201 },
		},
		{
			name: "flag equal to the default still beats env",
			args: []string{"--envoy-port", "15001"},
			env:  map[string]string{"ENVOY_PORT": "15101"},
		},
		{
			name: "env ISTIO_SERVICE_CIDR",
			env:  map[string]string{"ISTIO_SERVICE_CIDR": "10.96.0.0/12"},
			want: func(c *policy.Config) { c.OutboundCIDRs = policy.CIDRList{Prefixes: prefixes("10.96.0.0/12")} },
		},
		{
			name: `-i "" beats env ISTIO_SERVICE_CIDR`,
			args: []string{"-i", ""},
			env:  map[string]string{"ISTIO_SERVICE_CIDR": "10.96.0.0/12"},
			want: func(c *policy.Config) { c.OutboundCIDRs = policy.CIDRList{} },
		},
		{
			name: "env ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
			env:  map[string]string{"ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "22,25"},
			want: func(c *policy.Config) { c.OutboundExcludePorts = []uint16{22, 25} },
		},
		{
			name: "env ISTIO_INBOUND_PORTS, -b wins",
			args: []string{"-b", ""},
			env:  map[string]string{"ISTIO_INBOUND_PORTS": "80"},
			want: func(c *policy.Config) { c.InboundPorts = policy.PortList{} },
		},
		{
			name: "env ISTIO_INBOUND_PORTS list",
			env:  map[string]string{"ISTIO_INBOUND_PORTS": "80,8080"},
			want: func(c *policy.Config) { c.InboundPorts = policy.PortList{Ports: []uint16{80, 8080}} },
		},
		{
			name: "env ISTIO_INBOUND_INTERCEPTION_MODE and INBOUND_CAPTURE_PORT",
			env:  map[string]string{"ISTIO_INBOUND_INTERCEPTION_MODE": "TPROXY", "INBOUND_CAPTURE_PORT": "15106"},
			want: func(c *policy.Config) { c.Mode, c.InboundCapturePort = policy.TProxy, 15106 },
		},
		{
			name: "env ISTIO_SERVICE_EXCLUDE_CIDR and ISTIO_OUTBOUND_PORTS",
			env:  map[string]string{"ISTIO_SERVICE_EXCLUDE_CIDR": "10.0.0.1", "ISTIO_OUTBOUND_PORTS": "3306"},
			want: func(c *policy.Config) {
				c.OutboundExcludeCIDRs = prefixes("10.0.0.1/32")
				c.OutboundPorts = []uint16{3306}
			},
		},
		{
			name: "empty env is as if unset",
			env:  map[string]string{"ISTIO_INBOUND_PORTS": "", "ENVOY_PORT": ""},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := policy.Default()
			if tt.want != nil {
				tt.want(&want)
			}
			got, err := parse(tt.args, tt.env)
			require.NoError(t, err)
			require.Equal(t, want, got)
		})
	}
}

func TestFlagsErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		// want are substrings the message must contain: the flag, and how to fix it.
		want []string
	}{
		{name: "port 0", args: []string{"-p", "0"}, want: []string{"-p/--envoy-port", "1-65535"}},
		{name: "port 70000", args: []string{"--envoy-port", "70000"}, want: []string{"-p/--envoy-port", "1-65535"}},
		{name: "port abc", args: []string{"-z", "abc"}, want: []string{"-z/--inbound-capture-port", "1-65535"}},
		{name: "tunnel port -1", args: []string{"--inbound-tunnel-port=-1"}, want: []string{"-e/--inbound-tunnel-port", "1-65535"}},
		{name: "port 0 in a list", args: []string{"-b", "80,0"}, want: []string{"-b/--istio-inbound-ports", "1-65535"}},
		{name: "bad port in -d", args: []string{"-d", "15090,x"}, want: []string{"-d/--istio-local-exclude-ports", "1-65535"}},
		{name: "bad port in -q", args: []string{"-q", "99999"}, want: []string{"-q/--istio-outbound-ports", "1-65535"}},
		{name: "bad port in -o", args: []string{"-o", "22;25"}, want: []string{"-o/--istio-local-outbound-ports-exclude", "1-65535"}},
		{name: "bad port in env", env: map[string]string{"ENVOY_PORT": "abc"}, want: []string{"-p/--envoy-port", "1-65535"}},
		{name: "CIDR /33", args: []string{"-x", "10.0.0.0/33"}, want: []string{"-x/--istio-service-exclude-cidr", "10.0.0.0/8"}},
		{name: "not-a-cidr", args: []string{"-i", "not-a-cidr"}, want: []string{"-i/--istio-service-cidr", "10.0.0.0/8"}},
		{name: "* inside a list", args: []string{"-i", "10.0.0.0/8,*"}, want: []string{"-i/--istio-service-cidr", "10.0.0.0/8"}},
		{name: "unknown mode", args: []string{"-m", "FOO"}, want: []string{"-m/--istio-inbound-interception-mode", "REDIRECT or TPROXY"}},
		{
			name: "proxy port == inbound capture port",
			args: []string{"-p", "15006"},
			want: []string{"-p/--envoy-port", "-z/--inbound-capture-port", "different"},
		},
		{
			name: "inbound capture port == proxy port via env",
			env:  map[string]string{"INBOUND_CAPTURE_PORT": "15001"},
			want: []string{"-p/--envoy-port", "-z/--inbound-capture-port", "different"},
		},
		{name: "uid x", args: []string{"-u", "x"}, want: []string{"-u/--proxy-uid", "not a number"}},
		{name: "gid -1", args: []string{"--proxy-gid=-1"}, want: []string{"-g/--proxy-gid", "not a number"}},
		{name: "uid 2^32", args: []string{"-u", "4294967296"}, want: []string{"-u/--proxy-uid", "not a number"}},
		{name: "mark x", args: []string{"-t", "x"}, want: []string{"-t/--istio-inbound-tproxy-mark"}},
		{name: "route table x", args: []string{"-r", "x"}, want: []string{"-r/--istio-inbound-tproxy-route-table"}},

		// IPv6 ranges are fine (see TestFlagsMixedFamilies); broken ones name the flag.
		{name: "-i /129", args: []string{"-i", "fd00::/129"}, want: []string{"-i/--istio-service-cidr", `"fd00::/129"`, "0-128", "fd00::/8"}},
		{name: "-x /129 in env", env: map[string]string{"ISTIO_SERVICE_EXCLUDE_CIDR": "10.0.0.0/8,fd00::/129"}, want: []string{"-x/--istio-service-exclude-cidr", "$ISTIO_SERVICE_EXCLUDE_CIDR", "0-128"}},
		{name: "-x bad IPv6", args: []string{"-x", "fd00:::1/64"}, want: []string{"-x/--istio-service-exclude-cidr", "not a CIDR", "fd00::/8"}},
		{name: "-i IPv6 with zone", args: []string{"-i", "fe80::1%eth0"}, want: []string{"-i/--istio-service-cidr", "zone", "eth0"}},
		{name: "-i v4-mapped", args: []string{"-i", "::ffff:10.0.0.0/104"}, want: []string{"-i/--istio-service-cidr", "v4-mapped", "write 10.0.0.0/8"}},
		{name: "-x v4-mapped host", args: []string{"-x", "::ffff:10.0.0.1"}, want: []string{"-x/--istio-service-exclude-cidr", "v4-mapped", "write 10.0.0.1/32"}},
		{name: "--dual-stack maybe", args: []string{"--dual-stack=maybe"}, want: []string{"--dual-stack", "true or false"}},
		{name: "$ISTIO_DUAL_STACK yes", env: map[string]string{"ISTIO_DUAL_STACK": "yes"}, want: []string{"--dual-stack", "$ISTIO_DUAL_STACK", "true or false"}},
		// Lists are comma separated: a space-separated list says so, not "out of range".
		{name: "-o space separated", args: []string{"-o", "3306 5432"}, want: []string{"-o/--istio-local-outbound-ports-exclude", "separate", "commas", "3306,5432"}},
		{name: "-b space separated", args: []string{"-b", "80 443"}, want: []string{"-b/--istio-inbound-ports", "commas"}},
		{name: "-x space separated", args: []string{"-x", "10.0.0.0/8 192.168.0.0/16"}, want: []string{"-x/--istio-service-exclude-cidr", "commas", "10.0.0.0/8,192.168.0.0/16"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(tt.args, tt.env)
			require.Error(t, err)
			msg := err.Error()
			require.NotContains(t, msg, "\n", "error must be one line")
			for _, w := range tt.want {
				require.Contains(t, msg, w)
			}
		})
	}
}

// TestFlagsErrorNamesValue checks the message quotes what the user wrote.
func TestFlagsErrorNamesValue(t *testing.T) {
	_, err := parse([]string{"-i", "10.0.0.0/8,bogus"}, nil)
	require.Error(t, err)
	require.True(t, strings.Contains(err.Error(), `"bogus"`), err.Error())
}

func TestArgsRoundTrip(t *testing.T) {
	cmdlines := [][]string{
		nil,
		{"-b", "", "-i", ""},
		{"-u", "1000", "-g", "2000", "-m", "TPROXY", "-t", "7", "-r", "8"},
		{
			"-p", "15101", "-z", "15106", "-e", "15009", "-u", "0",
			"-b", "80,443,15008", "-d", "9000", "-q", "3306,5432", "-o", "22,25",
			"-i", "10.96.0.0/12,10.1.2.3", "-x", "169.254.169.254,10.96.0.1/32",
		},
		{"-b", "*", "-d", "", "-i", "*", "-x", "10.0.0.0/8"},
	}
	// Env is set to something else for every flag: Args gives every flag, so it must not leak in.
	env := map[string]string{}
	for _, name := range []string{
		policy.FlagProxyPort, policy.FlagInboundCapturePort, policy.FlagInboundTunnelPort,
		policy.FlagInboundExcludePorts, policy.FlagOutboundPorts, policy.FlagOutboundExcludePorts,
	} {
		env[policy.EnvVar(name)] = "4242"
	}
	env[policy.EnvVar(policy.FlagProxyUID)] = "4242"
	env[policy.EnvVar(policy.FlagProxyGID)] = "4343"
	env[policy.EnvVar(policy.FlagInboundPorts)] = "1,2"
	env[policy.EnvVar(policy.FlagOutboundCIDRs)] = "1.2.3.4"
	env[policy.EnvVar(policy.FlagOutboundExcludeCIDRs)] = "1.2.3.4"
	env[policy.EnvVar(policy.FlagMode)] = "TPROXY"

	for _, args := range cmdlines {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			cfg := mustParse(t, args...)
			again, err := parse(cfg.Args(), nil)
			require.NoError(t, err, "Args() = %q", cfg.Args())
			require.Equal(t, cfg, again, "Args() = %q", cfg.Args())

			withEnv, err := parse(cfg.Args(), env)
			require.NoError(t, err)
			require.Equal(t, cfg, withEnv, "env leaked past flags given by Args()")
		})
	}

	t.Run("Default", func(t *testing.T) {
		def := policy.Default()
		got, err := parse(def.Args(), nil)
		require.NoError(t, err)
		require.Equal(t, def, got)
	})
}

func TestListHelpers(t *testing.T) {
	all := policy.PortList{All: true}
	require.True(t, all.Contains(1))
	require.Equal(t, "*", all.String())
	some := policy.PortList{Ports: []uint16{80, 443}}
	require.True(t, some.Contains(443))
	require.False(t, some.Contains(8080))
	require.Equal(t, "80,443", some.String())
	require.False(t, policy.PortList{}.Contains(80))
	require.Equal(t, "", policy.PortList{}.String())

	cidrs := policy.CIDRList{Prefixes: prefixes("10.0.0.0/8", "fd00::/8")}
	require.True(t, cidrs.Contains(netip.MustParseAddr("10.2.3.4")))
	require.True(t, cidrs.Contains(netip.MustParseAddr("fd00::1")))
	require.False(t, cidrs.Contains(netip.MustParseAddr("11.0.0.1")))
	require.Equal(t, "10.0.0.0/8,fd00::/8", cidrs.String())
	require.True(t, policy.CIDRList{All: true}.Contains(netip.MustParseAddr("8.8.8.8")))
	require.Equal(t, "*", policy.CIDRList{All: true}.String())
	require.False(t, policy.CIDRList{}.Contains(netip.MustParseAddr("8.8.8.8")))

	cfg := policy.Config{OutboundCIDRs: policy.CIDRList{Prefixes: prefixes("10.0.0.0/8", "fd00::/8")}, OutboundExcludeCIDRs: prefixes("fd00:1::/32", "10.96.0.0/12")}
	require.Equal(t, prefixes("10.0.0.0/8"), cfg.IPv4OutboundCIDRs())
	require.Equal(t, prefixes("10.96.0.0/12"), cfg.IPv4OutboundExcludeCIDRs())
	def := policy.Default()
	require.Nil(t, def.IPv4OutboundCIDRs())
}

func TestModeString(t *testing.T) {
	require.Equal(t, "REDIRECT", policy.Redirect.String())
	require.Equal(t, "TPROXY", policy.TProxy.String())
}

// ParseArgs is Flags over its own flag set: the injector's command line over istio-iptables'
// own defaults is the injector's policy, and a bad flag or value is the same error.
func TestParseArgs(t *testing.T) {
	injector := []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
		"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}
	got, err := policy.ParseArgs(policy.IstioIptablesDefaults(), injector...)
	require.NoError(t, err)
	require.Equal(t, policy.Default(), got)

	got, err = policy.ParseArgs(policy.Default(), "-u", "1000", "-b", "8080")
	require.NoError(t, err)
	want, err := parse([]string{"-u", "1000", "-b", "8080"}, nil)
	require.NoError(t, err)
	require.Equal(t, want, got)

	for _, args := range [][]string{{"--no-such-flag"}, {"-p", "0"}, {"-p", "15006"}} {
		_, err := policy.ParseArgs(policy.Default(), args...)
		_, want := parse(args, nil)
		require.Error(t, err, "%q", args)
		require.Equal(t, want.Error(), err.Error(), "%q", args)
	}
}
