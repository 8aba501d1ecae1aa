package vmtests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// HostPrograms are what the test binaries exec (directly or through iptables/), copied
// from the host with their shared libraries. iptables' names are mostly symlinks to one
// multi-call binary, mirrored as such.
var HostPrograms = []string{
	"iptables", "iptables-save", "iptables-restore",
	"iptables-nft", "iptables-nft-save", "iptables-nft-restore",
	"iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore",
	"ip6tables", "ip6tables-save", "ip6tables-restore",
	"ip6tables-nft", "ip6tables-nft-save", "ip6tables-nft-restore",
	"ip6tables-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore",
	"haproxy", "ss", "ip", "nsenter",
	// The real resolvers of test/e2e's TestRealResolvers: dnsmasq as the nameserver and
	// the agent, dig, glibc's getent run in a private mount namespace (unshare, mount,
	// setpriv, through sh and awk).
	"dnsmasq", "dig", "getent", "unshare", "mount", "setpriv", "sh", "awk",
}

// HostLibDirs are copied whole, with the shared libraries of every file in them: iptables
// dlopen()s its match and target extensions from here, which ldd cannot see.
var HostLibDirs = []string{"/usr/lib/x86_64-linux-gnu/xtables"}

// Base is the kernel-independent part of the initramfs: the init, the test binaries and
// their testdata, the host programs and a minimal /etc.
//
// testBins maps each package to its built test binary; repo is the source tree root.
func Base(initBin string, pkgs []Package, testBins map[string]string, repo string) (*Initramfs, error) {
	r := NewInitramfs()
	// Mirror the merged-/usr top-level symlinks first, so that every host path added later
	// resolves the same way in the guest.
	for _, d := range []string{"/bin", "/sbin", "/lib", "/lib64"} {
		if t, err := os.Readlink(d); err == nil {
			r.Symlink(d, t)
		}
	}
	for _, d := range []string{"/proc", "/sys", "/dev", "/run", "/etc", "/usr/sbin"} {
		r.Dir(d, 0o755)
	}
	r.Dir("/tmp", 0o777|os.ModeSticky)
	r.Dir("/root", 0o700)
	r.CharDev("/dev/console", 5, 1, 0o600)
	r.File("/init", initBin, 0o755)
	// The kernel's default modprobe_path; the init logs what it is asked to load.
	sbin, err := filepath.EvalSymlinks("/sbin")
	if err != nil {
		sbin = "/sbin"
	}
	r.Symlink(filepath.Join(sbin, "modprobe"), "/init")

	r.Bytes("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"), 0o644)
	r.Bytes("/etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
	// glibc's resolver reads these; TestRealResolvers bind-mounts a pod's resolv.conf over
	// the empty one.
	r.Bytes("/etc/nsswitch.conf", []byte("passwd: files\ngroup: files\nhosts: files dns\n"), 0o644)
	r.Bytes("/etc/resolv.conf", nil, 0o644)
	for _, f := range []string{"/etc/protocols", "/etc/services", "/etc/ethertypes"} {
		if _, err := os.Stat(f); err == nil {
			if err := r.HostPath(f); err != nil {
				return nil, err
			}
		}
	}

	for _, p := range HostPrograms {
		if err := r.HostProgram(p); err != nil {
			return nil, err
		}
	}
	for _, d := range HostLibDirs {
		if err := r.HostPath(d); err != nil {
			return nil, err
		}
		libs, _ := filepath.Glob(filepath.Join(d, "*.so"))
		for _, l := range libs {
			if err := r.SharedLibs(l); err != nil {
				return nil, err
			}
		}
	}

	for _, p := range pkgs {
		r.File(filepath.Join(BinDir, p.Name+".test"), testBins[p.Path], 0o755)
		// Test binaries run in their package directory, as under go test, and some read
		// ./testdata (e.g. iptables' golden files).
		dir := filepath.Join(SrcDir, p.Dir)
		r.Dir(dir, 0o755)
		td := filepath.Join(repo, p.Dir, "testdata")
		if fi, err := os.Stat(td); err == nil && fi.IsDir() {
			if err := r.Tree(filepath.Join(dir, "testdata"), td); err != nil {
				return nil, err
			}
		}
	}
	return r, nil
}

// KernelPart is the kernel-specific part of the initramfs: the modules and the plan. It is
// written after Base as a second cpio archive; the kernel unpacks concatenated archives.
func KernelPart(mods []Module, plan Plan) (*Initramfs, error) {
	r := NewInitramfs()
	for i, m := range mods {
		r.Bytes(filepath.Join(ModuleDir, fmt.Sprintf("%03d-%s.ko", i, m.Name)), m.Data, 0o644)
	}
	b, err := json.MarshalIndent(plan, "", "  ")
	if err != nil {
		return nil, err
	}
	r.Bytes(PlanPath, b, 0o644)
	return r, nil
}
