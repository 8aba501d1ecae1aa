package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/meshdivert/divert/internal/image"
)

var (
	real  = flag.Bool("image.real", false, "build the real image (go build, Debian .debs from the mirror) and run what it holds (make image-check; root for chroot)")
	archs = flag.String("image.arch", "amd64", "with -image.real: the architectures to build (amd64 runs; others are checked as ELF files)")
)

const ref = "divert.test/divert:check"

// fakePackage is a stand-in for iptables' .debs: a data archive as dpkg-deb --fsys-tarfile
// prints it, with a file under /lib (merged into /usr), documentation (dropped but for the
// copyright) and xtables-nft-multi's names.
func fakePackage(t *testing.T) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range []tar.Header{
		{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "./lib/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "./lib/x86_64-linux-gnu/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "./lib/x86_64-linux-gnu/libc.so.6", Typeflag: tar.TypeReg, Mode: 0o755, Size: 4},
		{Name: "./usr/sbin/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "./usr/sbin/xtables-nft-multi", Typeflag: tar.TypeReg, Mode: 0o755, Size: 4},
		{Name: "./usr/sbin/iptables-nft", Typeflag: tar.TypeSymlink, Linkname: "xtables-nft-multi"},
		{Name: "./usr/sbin/iptables-nft-save", Typeflag: tar.TypeSymlink, Linkname: "xtables-nft-multi"},
		{Name: "./usr/sbin/iptables-nft-restore", Typeflag: tar.TypeSymlink, Linkname: "xtables-nft-multi"},
		{Name: "./usr/share/doc/iptables/changelog.gz", Typeflag: tar.TypeReg, Mode: 0o644, Size: 4},
		{Name: "./usr/share/doc/iptables/copyright", Typeflag: tar.TypeReg, Mode: 0o644, Size: 4},
		{Name: "./usr/share/man/man8/iptables.8.gz", Typeflag: tar.TypeReg, Mode: 0o644, Size: 4},
	} {
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			tw.Write([]byte("ELF!"))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// files is an image's flattened file system: path -> "-> target" for links, "dir", or the
// contents.
func files(t *testing.T, img v1.Image) map[string]string {
	t.Helper()
	out := map[string]string{}
	eachEntry(t, mutate.Extract(img), func(h *tar.Header, tr *tar.Reader) {
		p := "/" + strings.Trim(h.Name, "/")
		switch h.Typeflag {
		case tar.TypeSymlink:
			out[p] = "-> " + h.Linkname
		case tar.TypeDir:
			out[p] = "dir"
		default:
			b, _ := io.ReadAll(tr)
			out[p] = string(b)
		}
		if h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(epoch) {
			t.Errorf("%s: uid %d gid %d mtime %s: want root's, at the epoch", p, h.Uid, h.Gid, h.ModTime)
		}
	})
	return out
}

// eachEntry calls fn for each entry of the tar stream r, with the reader at its contents.
func eachEntry(t *testing.T, r io.Reader, fn func(h *tar.Header, tr *tar.Reader)) {
	t.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		fn(h, tr)
	}
}

// What the Go builder puts in the image is what the Dockerfile's final stage would: the
// entrypoint, the binaries of the build line where COPY puts them, the istio-iptables link,
// the packages apt-get install names (here a stand-in, unpacked as dpkg would), and
// nothing else on top. No Docker, no network, no go build: make test runs it.
func TestImageMatchesDockerfile(t *testing.T) {
	bins := t.TempDir()
	for _, b := range []string{"divert", "divert-cni", "divert-node"} {
		if err := os.WriteFile(filepath.Join(bins, b), []byte("binary "+b), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var asked []string
	b := builder{root: image.RepoRoot(), log: io.Discard, packages: func(arch string, names []string) ([][]byte, map[string][]byte, error) {
		asked = names
		return [][]byte{fakePackage(t)}, map[string][]byte{"iptables": []byte("Package: iptables\nVersion: 1.8.9-2\n")}, nil
	}}
	_, final, err := b.plan()
	if err != nil {
		t.Fatal(err)
	}
	var imgs []archImage
	for _, arch := range []string{"amd64", "arm64"} {
		ai, err := b.build(arch, final, bins)
		if err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, ai)
	}
	if !slices.Equal(asked, final.Packages) || !slices.Contains(asked, "iptables") {
		t.Errorf("packages: the builder asked for %v, the Dockerfile installs %v", asked, final.Packages)
	}
	out := t.TempDir()
	if err := write(out, ref, imgs); err != nil {
		t.Fatal(err)
	}
	var howto bytes.Buffer
	howTo(&howto, out, ref, imgs)
	for _, want := range []string{"ctr -n k8s.io images import", "docker load -i", "podman load -i", "crane push --index", "skopeo copy --all oci:"} {
		if !strings.Contains(howto.String(), want) {
			t.Errorf("make image does not tell how to %q:\n%s", want, howto.String())
		}
	}

	// Read back what was written: the docker-archive of each architecture and the OCI
	// layout's index with one manifest per platform.
	idx, err := layout.ImageIndexFromPath(filepath.Join(out, "oci"))
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 || im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "check" {
		t.Fatalf("OCI layout: want one index tagged check, got %+v (%v)", im, err)
	}
	inner, err := idx.ImageIndex(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	innerM, err := inner.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var platforms []string
	for _, m := range innerM.Manifests {
		platforms = append(platforms, m.Platform.String())
	}
	if !slices.Equal(platforms, []string{"linux/amd64", "linux/arm64/v8"}) {
		t.Errorf("OCI layout platforms: %v", platforms)
	}
	for _, ai := range imgs {
		tag := mustTag(t, ref)
		img, err := tarball.ImageFromPath(archivePath(out, ai.arch), &tag)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(cf.Config.Entrypoint, final.Entrypoint) || len(cf.Config.Cmd) != 0 || cf.OS != "linux" || cf.Architecture != ai.arch {
			t.Errorf("%s: config: entrypoint %v cmd %v %s/%s; the Dockerfile's ENTRYPOINT is %v", ai.arch, cf.Config.Entrypoint, cf.Config.Cmd, cf.OS, cf.Architecture, final.Entrypoint)
		}
		fs := files(t, img)
		for p, what := range final.Files() {
			want := what
			if !strings.HasPrefix(what, "-> ") {
				want = "binary " + what
			}
			if fs[p] != want {
				t.Errorf("%s: %s is %q, the Dockerfile puts %q there", ai.arch, p, fs[p], want)
			}
		}
		for p, want := range map[string]string{
			"/usr/sbin/iptables":                  "-> /etc/alternatives/iptables",
			"/etc/alternatives/iptables":          "-> /usr/sbin/iptables-nft",
			"/usr/sbin/iptables-restore":          "-> /etc/alternatives/iptables-restore",
			"/etc/alternatives/iptables-restore":  "-> /usr/sbin/iptables-nft-restore",
			"/usr/sbin/xtables-nft-multi":         "ELF!",
			"/lib":                                "-> usr/lib",
			"/usr/lib/x86_64-linux-gnu/libc.so.6": "ELF!",
			"/usr/share/doc/iptables/copyright":   "ELF!",
			"/tmp":                                "dir",
		} {
			if fs[p] != want {
				t.Errorf("%s: %s is %q, want %q (as dpkg and iptables' postinst leave it)", ai.arch, p, fs[p], want)
			}
		}
		for _, p := range []string{"/usr/share/doc/iptables/changelog.gz", "/usr/share/man/man8/iptables.8.gz", "/usr/sbin/ip6tables"} {
			if _, ok := fs[p]; ok {
				t.Errorf("%s: %s is in the image", ai.arch, p)
			}
		}
		if !strings.Contains(fs["/var/lib/dpkg/status.d/iptables"], "Status: install ok installed") {
			t.Errorf("%s: no dpkg status for iptables: %q", ai.arch, fs["/var/lib/dpkg/status.d/iptables"])
		}
		// The top layer is exactly what the Dockerfile's COPY and ln -s add.
		layers, err := img.Layers()
		if err != nil || len(layers) != 2 {
			t.Fatalf("%s: want 2 layers (packages, divert), got %d (%v)", ai.arch, len(layers), err)
		}
		top := layerFiles(t, layers[1])
		for p := range final.Files() {
			if !top[p] {
				t.Errorf("%s: the top layer lacks %s", ai.arch, p)
			}
			delete(top, p)
		}
		for p := range top {
			if !strings.HasSuffix(p, "/") {
				t.Errorf("%s: the top layer has %s, which the Dockerfile does not add", ai.arch, p)
			}
		}
	}
}

func layerFiles(t *testing.T, l v1.Layer) map[string]bool {
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	out := map[string]bool{}
	eachEntry(t, rc, func(h *tar.Header, _ *tar.Reader) { out["/"+strings.TrimPrefix(h.Name, "/")] = true })
	return out
}

// The real image (make image-check): built as make image builds it, its amd64 layers
// unpacked into a directory, then run: divert, istio-iptables (the link) and iptables with
// the image's own libraries (chroot). Other architectures are checked as ELF files.
func TestBuiltImage(t *testing.T) {
	if !*real {
		t.Skip("builds the real image from the network: make image-check (-image.real)")
	}
	cache := os.Getenv("DIVERT_IMAGE_CACHE")
	if cache == "" {
		cache = defaultCache()
	}
	b := builder{root: image.RepoRoot(), cache: cache, log: testWriter{t}}
	imgs, err := b.buildAll(strings.Split(*archs, ","))
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	if err := write(out, ref, imgs); err != nil {
		t.Fatal(err)
	}
	for _, ai := range imgs {
		tag := mustTag(t, ref)
		img, err := tarball.ImageFromPath(archivePath(out, ai.arch), &tag)
		if err != nil {
			t.Fatal(err)
		}
		root := t.TempDir()
		if err := unpack(img, root); err != nil {
			t.Fatal(err)
		}
		machine := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}[ai.arch]
		for _, p := range []string{"usr/local/bin/divert", "usr/local/bin/divert-cni", "usr/local/bin/divert-node", "usr/sbin/xtables-nft-multi", "usr/sbin/xtables-legacy-multi"} {
			f, err := elf.Open(filepath.Join(root, p))
			if err != nil {
				t.Errorf("%s: %s: %v", ai.arch, p, err)
				continue
			}
			if f.Machine != machine {
				t.Errorf("%s: %s is for %s", ai.arch, p, f.Machine)
			}
			f.Close()
		}
		if ai.arch != "amd64" {
			// Not run here: every library iptables loads must be in the image, for its arch.
			checkLibs(t, root, "usr/sbin/xtables-nft-multi", machine)
			checkLibs(t, root, "usr/sbin/xtables-legacy-multi", machine)
			continue
		}
		run := func(want string, name string, args ...string) {
			t.Helper()
			out, err := exec.Command(name, args...).CombinedOutput()
			if !strings.Contains(string(out), want) {
				t.Errorf("%s %s: %v\n%s\nwant %q", name, strings.Join(args, " "), err, out, want)
			} else {
				t.Logf("%s %s: %s", name, strings.Join(args, " "), strings.SplitN(string(out), "\n", 2)[0])
			}
		}
		run("divert 0.1", filepath.Join(root, "usr/local/bin/divert"), "--version")
		run("istio-iptables takes istio-iptables' flags", filepath.Join(root, "usr/local/bin/istio-iptables"), "--help")
		if os.Geteuid() != 0 {
			t.Log("not root: iptables not run in the image (chroot)")
			continue
		}
		run("(nf_tables)", "chroot", root, "/usr/sbin/iptables", "--version")
		run("(nf_tables)", "chroot", root, "/usr/sbin/iptables-nft-restore", "--version")
		run("(legacy)", "chroot", root, "/usr/sbin/iptables-legacy", "--version")
		// The image's loader and libc, not the host's: no /etc/ld.so.cache in it.
		run("libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6", "chroot", root, "/lib64/ld-linux-x86-64.so.2", "--list", "/usr/sbin/xtables-nft-multi")
	}
}

// unpack writes the image's flattened file system under dir.
func unpack(img v1.Image, dir string) error {
	tr := tar.NewReader(mutate.Extract(img))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		// Extract gives the top layer first: parents may come later.
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, os.FileMode(h.Mode).Perm())
		case tar.TypeSymlink:
			err = os.Symlink(h.Linkname, p)
		case tar.TypeLink:
			err = os.Link(filepath.Join(dir, filepath.Clean("/"+h.Linkname)), p)
		case tar.TypeReg:
			var f *os.File
			if f, err = os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode).Perm()); err == nil {
				_, err = io.Copy(f, tr)
				err = errors.Join(err, f.Close())
			}
		}
		if err != nil {
			return err
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// checkLibs checks that the ELF interpreter and every DT_NEEDED library of bin, recursively,
// are in the image at root (in /usr/lib/<triplet>, where Debian's ld.so looks) and built for
// machine.
func checkLibs(t *testing.T, root, bin string, machine elf.Machine) {
	t.Helper()
	seen := map[string]bool{}
	var visit func(p string)
	visit = func(p string) {
		f, err := elf.Open(filepath.Join(root, p))
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return
		}
		defer f.Close()
		if f.Machine != machine {
			t.Errorf("%s is for %s, want %s", p, f.Machine, machine)
		}
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				b, _ := io.ReadAll(prog.Open())
				interp := strings.TrimRight(string(b), "\x00")
				if _, err := os.Stat(filepath.Join(root, interp)); err != nil {
					t.Errorf("%s: its interpreter %s is not in the image", p, interp)
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			t.Error(err)
			return
		}
		for _, lib := range libs {
			if seen[lib] {
				continue
			}
			seen[lib] = true
			m, _ := filepath.Glob(filepath.Join(root, "usr/lib/*-linux-gnu", lib))
			if len(m) != 1 {
				t.Errorf("%s needs %s: %d copies in the image", p, lib, len(m))
				continue
			}
			rel, _ := filepath.Rel(root, m[0])
			visit(rel)
		}
	}
	visit(bin)
	t.Logf("%s: %d libraries, all in the image for %s", bin, len(seen), machine)
}
