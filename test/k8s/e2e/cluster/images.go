package cluster

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image is a container image made from host files, without Docker or a registry: one layer
// per FileSet, written as a docker-archive with go-containerregistry and imported into the
// cluster's containerd, where pods use it with imagePullPolicy: Never.
type Image struct {
	Ref        string // e.g. divert.test/testapp:e2e
	Layers     []FileSet
	Entrypoint []string
	Env        []string
}

// File is one entry of a layer: the contents of a host file (Src), inline Data, or a
// symlink (Link).
type File struct {
	Path string // absolute path in the image
	Src  string
	Data []byte
	Link string
	Mode int64 // 0 means 0755 for Src files and 0644 for Data
}

// FileSet is the content of one layer.
type FileSet []File

// epoch fixes every mtime so an unchanged binary gives an identical layer digest.
var epoch = time.Unix(0, 0)

func layerTar(files FileSet) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	mkdirs := func(p string) error {
		var parents []string
		for d := filepath.Dir(p); d != "/" && !dirs[d]; d = filepath.Dir(d) {
			parents = append(parents, d)
			dirs[d] = true
		}
		slices.Reverse(parents)
		for _, d := range parents {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/", Mode: 0o755, ModTime: epoch}); err != nil {
				return err
			}
		}
		return nil
	}
	for _, f := range files {
		if err := mkdirs(f.Path); err != nil {
			return nil, err
		}
		name := strings.TrimPrefix(f.Path, "/")
		if f.Link != "" {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: f.Link, Mode: 0o777, ModTime: epoch}); err != nil {
				return nil, err
			}
			continue
		}
		data, mode := f.Data, f.Mode
		if f.Src != "" {
			b, err := os.ReadFile(f.Src) // follows symlinks: the image gets the real file
			if err != nil {
				return nil, err
			}
			data = b
			if mode == 0 {
				mode = 0o755
			}
		} else if mode == 0 {
			mode = 0o644
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: int64(len(data)), Mode: mode, ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (im Image) build() (v1.Image, error) {
	img := empty.Image
	for _, fs := range im.Layers {
		b, err := layerTar(fs)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.Ref, err)
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
		if err != nil {
			return nil, err
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			return nil, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = im.Entrypoint
	cf.Config.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, im.Env...)
	return mutate.ConfigFile(img, cf)
}

// writeArchive writes all images into one docker-archive tarball (one `ctr import`).
func writeArchive(path string, imgs []Image) error {
	refs := map[name.Reference]v1.Image{}
	for _, im := range imgs {
		tag, err := name.NewTag(im.Ref)
		if err != nil {
			return err
		}
		img, err := im.build()
		if err != nil {
			return err
		}
		refs[tag] = img
	}
	return tarball.MultiRefWriteToFile(path, refs)
}

// ImportImages builds the images and loads them into the cluster's containerd, in the
// k8s.io namespace the CRI plugin uses.
func (c *Cluster) ImportImages(imgs []Image) error {
	path := filepath.Join(c.State, "images.tar")
	if err := writeArchive(path, imgs); err != nil {
		return err
	}
	defer os.Remove(path)
	out, err := exec.Command("ctr", "--address", c.containerdSock(), "-n", "k8s.io", "images", "import", path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import: %v\n%s", err, out)
	}
	return nil
}

// SharedLibs returns the files a dynamically linked host binary needs to run in an empty
// image: its ELF interpreter and every DT_NEEDED library, recursively, each at the path the
// dynamic loader searches (the host's multiarch directories).
func SharedLibs(bins ...string) (FileSet, error) {
	searchDirs := []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib"}
	seen := map[string]bool{}
	var out FileSet
	var visit func(p string) error
	visit = func(p string) error {
		f, err := elf.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		for _, prog := range f.Progs {
			if prog.Type != elf.PT_INTERP {
				continue
			}
			b, err := io.ReadAll(prog.Open())
			if err != nil {
				return err
			}
			interp := strings.TrimRight(string(b), "\x00")
			if !seen[interp] {
				seen[interp] = true
				out = append(out, File{Path: interp, Src: interp})
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			return err
		}
		for _, lib := range libs {
			if seen[lib] {
				continue
			}
			seen[lib] = true
			found := ""
			for _, d := range searchDirs {
				if _, err := os.Stat(filepath.Join(d, lib)); err == nil {
					found = filepath.Join(d, lib)
					break
				}
			}
			if found == "" {
				return fmt.Errorf("%s needs %s, not found on the host", p, lib)
			}
			out = append(out, File{Path: found, Src: found})
			if err := visit(found); err != nil {
				return err
			}
		}
		return nil
	}
	for _, b := range bins {
		if err := visit(b); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// IptablesLayer is the host's iptables (Debian 12's 1.8.9, the same package a
// debian:bookworm-slim Dockerfile would install): both multi-call binaries with the names
// iptables answers to, the extension modules it dlopens, and every library they need.
// Copying them keeps the image free of a base image while the iptables fallback still runs
// real iptables-restore inside the pod.
func IptablesLayer() (FileSet, error) {
	const xtdir = "/usr/lib/x86_64-linux-gnu/xtables"
	bins := []string{"/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi"}
	exts, err := filepath.Glob(xtdir + "/*.so")
	if err != nil || len(exts) == 0 {
		return nil, fmt.Errorf("no iptables extensions in %s", xtdir)
	}
	fs, err := SharedLibs(append(slices.Clone(bins), exts...)...)
	if err != nil {
		return nil, err
	}
	for _, b := range bins {
		fs = append(fs, File{Path: b, Src: b})
	}
	for _, e := range exts {
		fs = append(fs, File{Path: e, Src: e, Mode: 0o644})
	}
	for _, n := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
		fs = append(fs, File{Path: "/usr/sbin/" + n, Link: "xtables-nft-multi"})
	}
	for _, v := range []string{"nft", "legacy"} {
		for _, n := range []string{"iptables", "ip6tables"} {
			for _, s := range []string{"", "-save", "-restore"} {
				fs = append(fs, File{Path: "/usr/sbin/" + n + "-" + v + s, Link: "xtables-" + v + "-multi"})
			}
		}
	}
	// iptables-legacy takes a lock in /run; /etc/protocols resolves protocol names.
	fs = append(fs, File{Path: "/run/xtables.lock", Data: []byte{}, Mode: 0o600})
	if _, err := os.Stat("/etc/protocols"); err == nil {
		fs = append(fs, File{Path: "/etc/protocols", Src: "/etc/protocols", Mode: 0o644})
	}
	return fs, nil
}
