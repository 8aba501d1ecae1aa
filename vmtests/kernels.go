package vmtests

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/meshdivert/divert/internal/debapt"
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

// NewApt is the private apt configuration (internal/debapt) under dir that fetches the
// guests' kernels; the mirrors are $VMTEST_MIRROR / $VMTEST_SECURITY_MIRROR, else the
// system's.
func NewApt(dir string, log io.Writer) (*debapt.Apt, error) {
	return debapt.New(dir, "", "VMTEST_MIRROR", "VMTEST_SECURITY_MIRROR", log)
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
func Fetch(a *debapt.Apt, k Kernel, cacheDir string) (*Extracted, error) {
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

func fetch(a *debapt.Apt, k Kernel, root string) error {
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
func ListCandidates(a *debapt.Apt, w io.Writer) error {
	if err := a.Update(); err != nil {
		return err
	}
	// ABI-numbered images (linux-image-6.1.0-50-amd64, linux-image-6.12.117+deb12-amd64),
	// not the meta packages (linux-image-6.1-amd64) nor the cloud and rt flavours.
	out, err := a.Output("apt-cache", "search", "--names-only", `^linux-image-[0-9]+\.[0-9]+\.[0-9]+[^ ]*-amd64$`)
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
	out, err = a.Output("apt-cache", append([]string{"policy"}, names...)...)
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
