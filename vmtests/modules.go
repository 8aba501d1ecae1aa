package vmtests

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Modules the suites need that Debian builds as modules (=m). The guest loads them, with
// their dependencies, before any test runs. Names missing from a kernel (built in, or
// renamed between versions) are skipped; an autoload request for anything not listed is
// logged by the guest's modprobe stand-in, which names the module to add here.
var Modules = []string{
	// libcrc32c (needed by nf_tables, nf_conntrack, nf_nat) asks the crypto API for "crc32c"
	// when it loads: a soft dependency that .modinfo names only by alias. Load it first.
	"crc32c_generic",
	"veth",
	// vishvananda/netlink's handles open a NETLINK_XFRM socket too (net-pf-16-proto-6).
	"xfrm_user",
	// ss (test/e2e) asks sock_diag for TCP sockets (net-pf-16-proto-4-type-2).
	"inet_diag", "tcp_diag",
	// iptables-nft: nf_tables with the x_tables matches and targets through nft_compat.
	"nf_tables", "nft_compat", "nft_chain_nat", "nft_nat", "nft_redir", "nft_ct", "nft_counter",
	// iptables-legacy.
	"ip_tables", "iptable_nat", "iptable_mangle", "iptable_filter", "iptable_raw",
	"ip6_tables", "ip6table_nat", "ip6table_mangle", "ip6table_filter", "ip6table_raw",
	// What istio-iptables' rules use (see iptables/testdata).
	"nf_conntrack", "nf_nat", "xt_owner", "xt_REDIRECT", "xt_mark", "xt_connmark", "xt_conntrack",
	"xt_TPROXY", "xt_socket", "xt_multiport", "xt_comment", "xt_tcpudp",
	"xt_CT", // DNS capture's conntrack zones (raw table)
	"nf_tproxy_ipv4", "nf_tproxy_ipv6", "nf_socket_ipv4", "nf_socket_ipv6",
}

// Module is a kernel module file, uncompressed, ready for finit_module.
type Module struct {
	Name string
	Data []byte
}

// ResolveModules returns want and their dependencies from the kernel tree under
// root/lib/modules/<release>, dependencies first. Debian's packages ship no modules.dep
// (depmod runs at install time), so dependencies come from each module's .modinfo.
// skipped lists wanted names that are built in or absent.
func ResolveModules(root, release string, want []string) (mods []Module, skipped []string, err error) {
	dir := filepath.Join(root, "lib/modules", release)
	files := map[string]string{} // module name -> file
	err = filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if name, ok := moduleName(p); ok && !d.IsDir() {
			files[name] = p
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			if n, ok := moduleName(l); ok {
				builtin[n] = true
			}
		}
	}

	done := map[string]bool{}
	var visit func(name string, stack []string) error
	visit = func(name string, stack []string) error {
		if done[name] {
			return nil
		}
		done[name] = true
		f, ok := files[name]
		if !ok {
			if len(stack) == 0 {
				skipped = append(skipped, name)
			} else if !builtin[name] {
				return fmt.Errorf("module %s (needed by %s) not found under %s", name, stack[len(stack)-1], dir)
			}
			return nil
		}
		data, err := readModule(f)
		if err != nil {
			return err
		}
		deps, err := modinfoDepends(data)
		if err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		for _, d := range deps {
			if err := visit(d, append(stack, name)); err != nil {
				return err
			}
		}
		mods = append(mods, Module{Name: name, Data: data})
		return nil
	}
	for _, w := range want {
		if err := visit(normalize(w), nil); err != nil {
			return nil, nil, err
		}
	}
	return mods, skipped, nil
}

// moduleName turns ".../xt_REDIRECT.ko.xz" into "xt_REDIRECT"; module names use '_' where
// file names may use '-'.
func moduleName(p string) (string, bool) {
	base := filepath.Base(p)
	for _, ext := range []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"} {
		if strings.HasSuffix(base, ext) {
			return normalize(strings.TrimSuffix(base, ext)), true
		}
	}
	return "", false
}

func normalize(name string) string { return strings.ReplaceAll(name, "-", "_") }

// readModule returns the module decompressed, so the guest needs no in-kernel
// decompression support (5.10 and 6.1 have none; 6.12's Debian modules are .ko.xz).
func readModule(p string) ([]byte, error) {
	var cmd *exec.Cmd
	switch {
	case strings.HasSuffix(p, ".ko"):
		return os.ReadFile(p)
	case strings.HasSuffix(p, ".gz"):
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, err
		}
		return io.ReadAll(zr)
	case strings.HasSuffix(p, ".xz"):
		cmd = exec.Command("xz", "-dc", p)
	case strings.HasSuffix(p, ".zst"):
		cmd = exec.Command("zstd", "-dcq", p)
	}
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", cmd.Args[0], p, err)
	}
	return out, nil
}

// modinfoDepends reads "depends=a,b" from the module's .modinfo section.
func modinfoDepends(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}
