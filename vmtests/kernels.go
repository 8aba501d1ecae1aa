package vmtests

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Kernel is one line of kernels.txt.
type Kernel struct {
	Name    string // short name used on the command line and in reports: 6.1
	Suite   string // Debian suite that has the package: bookworm, bullseye-security, ...
	Package string // linux-image-6.1.0-50-amd64
	Version string // 6.1.176-1
}

// ReadKernels parses kernels.txt: "<name> <suite> <package>=<version>" per line, # comments.
func ReadKernels(path string) ([]Kernel, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var ks []Kernel
	for i, line := range strings.Split(string(b), "\n") {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		pkg, ver, ok := strings.Cut(f[len(f)-1], "=")
		if len(f) != 3 || !ok || pkg == "" || ver == "" {
			return nil, fmt.Errorf("%s:%d: want <name> <suite> <package>=<version>, got %q", path, i+1, line)
		}
		ks = append(ks, Kernel{Name: f[0], Suite: f[1], Package: pkg, Version: ver})
	}
	if len(ks) == 0 {
		return nil, fmt.Errorf("%s: no kernels", path)
	}
	return ks, nil
}

// Apt runs apt-get/apt-cache with a private configuration under Dir: its own sources list,
// package lists, archive cache and an empty dpkg status, so the system's apt state is
// neither read for sources nor changed. Only the mirror hosts come from the system.
type Apt struct {
	Dir      string
	Mirror   string // e.g. http://deb.debian.org/debian
	Security string // e.g. http://deb.debian.org/debian-security
	Log      io.Writer
}

// NewApt picks the mirrors: $VMTEST_MIRROR / $VMTEST_SECURITY_MIRROR, else the ones the
// system's apt sources already use (the only Debian hosts some machines can reach).
func NewApt(dir string, log io.Writer) (*Apt, error) {
	a := &Apt{Dir: dir, Mirror: os.Getenv("VMTEST_MIRROR"), Security: os.Getenv("VMTEST_SECURITY_MIRROR"), Log: log}
	if a.Mirror == "" || a.Security == "" {
		main, sec := systemMirrors()
		a.Mirror = first(a.Mirror, main)
		a.Security = first(a.Security, sec)
	}
	if a.Mirror == "" {
		return nil, errors.New("no Debian mirror in /etc/apt/sources.list{,.d}: set VMTEST_MIRROR=http://<host>/debian")
	}
	if a.Security == "" {
		if u, err := url.Parse(a.Mirror); err == nil {
			u.Path = "/debian-security"
			a.Security = u.String()
		}
	}
	return a, nil
}

func first(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

// systemMirrors returns the first .../debian and .../debian-security URIs found in the
// system's one-line (.list) or deb822 (.sources) apt sources.
func systemMirrors() (main, security string) {
	files := []string{"/etc/apt/sources.list"}
	for _, pat := range []string{"*.list", "*.sources"} {
		m, _ := filepath.Glob(filepath.Join("/etc/apt/sources.list.d", pat))
		files = append(files, m...)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(strings.TrimSpace(line), "#") {
				continue
			}
			for _, w := range strings.Fields(line) {
				u, err := url.Parse(w)
				if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
					continue
				}
				p := strings.TrimSuffix(u.Path, "/")
				switch {
				case strings.HasSuffix(p, "/debian-security") && security == "":
					security = strings.TrimSuffix(w, "/")
				case strings.HasSuffix(p, "/debian") && main == "":
					main = strings.TrimSuffix(w, "/")
				}
			}
		}
	}
	return main, security
}

func (a *Apt) sourcesPath() string { return filepath.Join(a.Dir, "sources.list") }

// args are the -o options that make apt private to Dir.
func (a *Apt) args() []string {
	o := func(k, v string) []string { return []string{"-o", k + "=" + v} }
	var args []string
	for _, kv := range [][2]string{
		{"Dir::Etc::SourceList", a.sourcesPath()},
		{"Dir::Etc::SourceParts", filepath.Join(a.Dir, "sources.list.d")},
		{"Dir::Etc::PreferencesParts", filepath.Join(a.Dir, "preferences.d")},
		{"Dir::Etc::Preferences", filepath.Join(a.Dir, "preferences")},
		{"Dir::State::Lists", filepath.Join(a.Dir, "lists")},
		{"Dir::State::status", filepath.Join(a.Dir, "status")},
		{"Dir::Cache", filepath.Join(a.Dir, "cache")},
		{"APT::Sandbox::User", "root"}, // _apt cannot write into a root-owned cache dir
		{"Acquire::Languages", "none"},
	} {
		args = append(args, o(kv[0], kv[1])...)
	}
	return args
}

// Setup writes the private sources list for the suites and reports whether it changed.
func (a *Apt) Setup(suites []string) (changed bool, err error) {
	for _, d := range []string{"sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(a.Dir, d), 0o755); err != nil {
			return false, err
		}
	}
	if _, err := os.Stat(filepath.Join(a.Dir, "status")); err != nil {
		if err := os.WriteFile(filepath.Join(a.Dir, "status"), nil, 0o644); err != nil {
			return false, err
		}
	}
	var b strings.Builder
	seen := map[string]bool{}
	for _, s := range suites {
		if seen[s] {
			continue
		}
		seen[s] = true
		uri := a.Mirror
		if strings.HasSuffix(s, "-security") {
			uri = a.Security
		}
		fmt.Fprintf(&b, "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n", uri, s)
	}
	old, _ := os.ReadFile(a.sourcesPath())
	if string(old) == b.String() {
		return false, nil
	}
	return true, os.WriteFile(a.sourcesPath(), []byte(b.String()), 0o644)
}

// Update refreshes the private package lists.
func (a *Apt) Update() error {
	return a.run("", "apt-get", append(a.args(), "-q", "update")...)
}

// Download fetches pkg=version into dir.
func (a *Apt) Download(dir, pkgVersion string) error {
	return a.run(dir, "apt-get", append(a.args(), "-q", "download", pkgVersion)...)
}

// Cache runs apt-cache (search, policy, ...) under the private configuration.
func (a *Apt) Cache(args ...string) ([]byte, error) {
	cmd := exec.Command("apt-cache", append(a.args(), args...)...)
	cmd.Stderr = a.Log
	return cmd.Output()
}

func (a *Apt) run(dir, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = a.Log, a.Log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w", name, args[len(args)-1], err)
	}
	return nil
}

// Extracted is a kernel package unpacked in the cache.
type Extracted struct {
	Root    string // dpkg-deb -x output
	Release string // uname -r, the lib/modules/<release> directory
	Image   string // what qemu boots: the uncompressed vmlinux if extraction worked, else vmlinuz
}

// Fetch returns the kernel extracted under cacheDir/kernels, downloading it with apt if
// this exact package version is not there yet. A finished extraction is marked by a
// ".complete" file, so an interrupted one is redone rather than trusted.
func Fetch(a *Apt, k Kernel, cacheDir string) (*Extracted, error) {
	root := filepath.Join(cacheDir, "kernels", k.Package+"_"+k.Version)
	done := filepath.Join(root, ".complete")
	if _, err := os.Stat(done); err != nil {
		if err := fetch(a, k, root); err != nil {
			return nil, err
		}
		if err := os.WriteFile(done, nil, 0o644); err != nil {
			return nil, err
		}
	}
	mods, _ := filepath.Glob(filepath.Join(root, "lib/modules/*"))
	if len(mods) != 1 {
		return nil, fmt.Errorf("%s: want one lib/modules/<release>, found %d", root, len(mods))
	}
	x := &Extracted{Root: root, Release: filepath.Base(mods[0])}
	x.Image = filepath.Join(root, "vmlinux")
	if _, err := os.Stat(x.Image); err != nil {
		x.Image = filepath.Join(root, "boot", "vmlinuz-"+x.Release)
	}
	return x, nil
}

func fetch(a *Apt, k Kernel, root string) error {
	if err := os.RemoveAll(root); err != nil {
		return err
	}
	dl := root + ".download"
	if err := os.MkdirAll(dl, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dl)
	pv := k.Package + "=" + k.Version
	if err := a.Download(dl, pv); err != nil {
		// The lists may be missing or older than the pin: refresh once and retry.
		fmt.Fprintf(a.Log, "vmtest: %s not in the package lists; running apt-get update\n", pv)
		if err := a.Update(); err != nil {
			return err
		}
		if err := a.Download(dl, pv); err != nil {
			return fmt.Errorf("%w: %s is not on %s any more? `go run ./vmtests/cmd/vmtest -list` shows what is, and vmtests/kernels.txt is the file to change", err, pv, k.Suite)
		}
	}
	debs, _ := filepath.Glob(filepath.Join(dl, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("apt-get download %s left %d .deb files", pv, len(debs))
	}
	if out, err := exec.Command("dpkg-deb", "-x", debs[0], root).CombinedOutput(); err != nil {
		return fmt.Errorf("dpkg-deb -x %s: %v: %s", debs[0], err, out)
	}
	imgs, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(imgs) != 1 {
		return fmt.Errorf("%s: want one boot/vmlinuz-*, found %d", root, len(imgs))
	}
	// qemu boots an ELF vmlinux directly through its PVH entry point, skipping the bzImage
	// self-decompression, which is slow under TCG (the notes measured about half the boot).
	if err := ExtractVmlinux(imgs[0], filepath.Join(root, "vmlinux")); err != nil {
		fmt.Fprintf(a.Log, "vmtest: %v; booting the compressed image instead\n", err)
	}
	return nil
}

// ExtractVmlinux writes the ELF kernel inside a bzImage to dst, like the kernel's
// scripts/extract-vmlinux, but using the boot protocol's payload_offset/payload_length
// instead of scanning for magic numbers.
func ExtractVmlinux(bzImage, dst string) error {
	b, err := os.ReadFile(bzImage)
	if err != nil {
		return err
	}
	if len(b) < 0x250 || string(b[0x202:0x206]) != "HdrS" {
		return fmt.Errorf("%s: not a bzImage", bzImage)
	}
	setupSects := int(b[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	pm := (setupSects + 1) * 512 // protected-mode code starts here; offsets are relative to it
	off := pm + int(binary.LittleEndian.Uint32(b[0x248:]))
	n := int(binary.LittleEndian.Uint32(b[0x24c:]))
	if off+n > len(b) || n < 4 {
		return fmt.Errorf("%s: bad payload bounds", bzImage)
	}
	payload := b[off : off+n]
	var cmd *exec.Cmd
	switch {
	case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
		cmd = exec.Command("xz", "-dc", "--single-stream")
	case bytes.HasPrefix(payload, []byte("\x28\xb5\x2f\xfd")):
		cmd = exec.Command("zstd", "-dcq")
	case bytes.HasPrefix(payload, []byte("\x1f\x8b")):
		cmd = exec.Command("gzip", "-dc")
	default:
		return fmt.Errorf("%s: unknown kernel compression %x", bzImage, payload[:4])
	}
	cmd.Stdin = bytes.NewReader(payload)
	var out bytes.Buffer
	cmd.Stdout = &out
	// The payload carries the uncompressed size as a 4-byte trailer, which some
	// decompressors call trailing garbage: judge by the output, not the exit status.
	runErr := cmd.Run()
	if _, err := elf.NewFile(bytes.NewReader(out.Bytes())); err != nil {
		return fmt.Errorf("extract vmlinux from %s with %s: %v (%v)", bzImage, cmd.Args[0], err, runErr)
	}
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, out.Bytes(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// ListCandidates prints, per suite, the newest linux-image-<abi>-amd64 packages the mirror
// offers, as kernels.txt lines, for updating the pins.
func ListCandidates(a *Apt, w io.Writer) error {
	if err := a.Update(); err != nil {
		return err
	}
	// ABI-numbered images (linux-image-6.1.0-50-amd64, linux-image-6.12.117+deb12-amd64),
	// not the meta packages (linux-image-6.1-amd64) nor the cloud and rt flavours.
	out, err := a.Cache("search", "--names-only", `^linux-image-[0-9]+\.[0-9]+\.[0-9]+[^ ]*-amd64$`)
	if err != nil {
		return err
	}
	var names []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		name, _, _ := strings.Cut(sc.Text(), " ")
		if !strings.HasSuffix(name, "-cloud-amd64") && !strings.HasSuffix(name, "-rt-amd64") {
			names = append(names, name)
		}
	}
	out, err = a.Cache(append([]string{"policy"}, names...)...)
	if err != nil {
		return err
	}
	// apt-cache policy: "<pkg>:" then "     <version> <prio>" and "        <prio> <uri> <suite>/main ...".
	var pkg, ver string
	var lines []string
	sc = bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		switch {
		case !strings.HasPrefix(line, " ") && strings.HasSuffix(line, ":"):
			pkg = strings.TrimSuffix(line, ":")
		case len(f) == 2 && !strings.HasPrefix(line, "  Installed") && !strings.HasPrefix(line, "  Candidate"):
			ver = f[0]
		case len(f) >= 4 && strings.Contains(f[1], "://"):
			suite, _, _ := strings.Cut(f[2], "/")
			lines = append(lines, fmt.Sprintf("%-18s %s=%s", suite, pkg, ver))
		}
	}
	sort.Strings(lines)
	_, err = fmt.Fprintln(w, strings.Join(lines, "\n"))
	return err
}
