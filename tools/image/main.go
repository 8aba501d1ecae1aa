// Command image builds divert's OCI image without Docker (make image): the Dockerfile's
// final stage, read by internal/image, rebuilt with go-containerregistry for linux/amd64
// and linux/arm64. The binaries come from the Dockerfile's own go build line,
// cross-compiled (CGO_ENABLED=0; the BPF objects are embedded and arch-neutral); the base
// is the Dockerfile's `apt-get install iptables`: Debian 12's iptables and every package
// it depends on, downloaded for each architecture with a private apt configuration and
// unpacked as dpkg would, without a shell or the rest of debian:12-slim (docs/install.md).
//
//	go run . -o ../../bin/image -ref ghcr.io/meshdivert/divert:0.1.0 [-arch amd64,arm64]
//
// It writes DIR/oci (an OCI layout: one index, a manifest per platform) and
// DIR/divert-<arch>.tar (docker-archives, for docker/podman load and ctr images import),
// then prints how to load or push them.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/meshdivert/divert/internal/image"
)

func main() {
	out := flag.String("o", "", "output directory (its oci/ and divert-<arch>.tar are replaced)")
	ref := flag.String("ref", "", "the image reference to tag, e.g. ghcr.io/meshdivert/divert:0.1.0")
	archs := flag.String("arch", "amd64,arm64", "comma-separated architectures")
	cache := flag.String("cache", defaultCache(), "where the private apt lists and downloaded .debs are kept")
	flag.Parse()
	if *out == "" || *ref == "" {
		fmt.Fprintln(os.Stderr, "image: -o DIR and -ref IMAGE are required")
		os.Exit(2)
	}
	start := time.Now()
	b := builder{root: image.RepoRoot(), cache: *cache, log: os.Stderr}
	imgs, err := b.buildAll(strings.Split(*archs, ","))
	if err == nil {
		err = write(*out, *ref, imgs)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "image: built in %s\n", time.Since(start).Round(time.Second))
	howTo(os.Stdout, *out, *ref, imgs)
}

func defaultCache() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "divert-image")
	}
	return filepath.Join(os.TempDir(), "divert-image-cache")
}

// builder makes one image per architecture from the Dockerfile.
type builder struct {
	root  string // the repository
	cache string
	log   io.Writer
	// packages, when set, replaces apt: it returns the data archives (dpkg-deb
	// --fsys-tarfile) and control fields of the closure of names for arch (tests).
	packages func(arch string, names []string) (data [][]byte, controls map[string][]byte, err error)
}

type archImage struct {
	arch string
	img  v1.Image
	pkgs []string // name=version, for the summary
}

func (b builder) plan() (image.BuildCommand, image.Final, error) {
	instrs, err := image.Parse(filepath.Join(b.root, "Dockerfile"))
	if err != nil {
		return image.BuildCommand{}, image.Final{}, err
	}
	bc, err := image.FindBuild(instrs)
	if err != nil {
		return bc, image.Final{}, err
	}
	f, err := image.FinalStage(instrs, bc)
	if err != nil {
		return bc, f, err
	}
	if f.Base != "debian:12-slim" {
		return bc, f, fmt.Errorf("the Dockerfile's final stage is FROM %s; make image rebuilds debian:12-slim's packages only (tools/image)", f.Base)
	}
	return bc, f, nil
}

func (b builder) buildAll(archs []string) ([]archImage, error) {
	bc, f, err := b.plan()
	if err != nil {
		return nil, err
	}
	var out []archImage
	for _, arch := range archs {
		bins, err := os.MkdirTemp("", "divert-image-bin-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(bins)
		fmt.Fprintf(b.log, "image: %s: go build (%s GOOS=linux GOARCH=%s)\n", arch, strings.Join(bc.Env, " "), arch)
		if err := bc.RunEnv(b.root, bins, "GOOS=linux", "GOARCH="+arch); err != nil {
			return nil, err
		}
		ai, err := b.build(arch, f, bins)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", arch, err)
		}
		out = append(out, ai)
	}
	return out, nil
}

// fetchPackages downloads the closure of names for arch with the private apt.
func (b builder) fetchPackages(arch string, names []string) ([][]byte, map[string][]byte, []string, error) {
	if b.packages != nil {
		data, controls, err := b.packages(arch, names)
		var list []string
		for n := range controls {
			list = append(list, n)
		}
		return data, controls, list, err
	}
	a, err := newApt(filepath.Join(b.cache, "apt-"+arch), arch, b.log)
	if err != nil {
		return nil, nil, nil, err
	}
	pkgs, debs, err := a.fetch(names)
	if err != nil {
		return nil, nil, nil, err
	}
	controls := map[string][]byte{}
	var data [][]byte
	var list []string
	for i, d := range debs {
		tarData, control, err := debData(d)
		if err != nil {
			return nil, nil, nil, err
		}
		data = append(data, tarData)
		controls[pkgs[i].Name] = control
		list = append(list, pkgs[i].Name+"="+pkgs[i].Version)
	}
	return data, controls, list, nil
}

// build assembles one architecture's image: a layer with the packages (what FROM and the
// apt-get install RUN leave), a layer with what the COPY and ln -s steps add, and the
// ENTRYPOINT.
func (b builder) build(arch string, f image.Final, bins string) (archImage, error) {
	data, controls, list, err := b.fetchPackages(arch, f.Packages)
	if err != nil {
		return archImage{}, err
	}
	base := tree{}
	for _, d := range data {
		if err := base.addPackage(bytes.NewReader(d)); err != nil {
			return archImage{}, err
		}
	}
	base.finishBase(controls)
	top := tree{}
	for _, c := range f.Copies {
		for _, bin := range c.Binaries {
			content, mode, err := readFile(filepath.Join(bins, bin))
			if err != nil {
				return archImage{}, err
			}
			top.file(filepath.Join(c.Dest, bin), mode, content)
		}
	}
	for _, l := range f.Links {
		top.link(l.Path, l.Target)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, t := range []tree{base, top} {
		gz, err := t.tarball()
		if err != nil {
			return archImage{}, err
		}
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(gz)), nil },
			tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return archImage{}, err
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: l, MediaType: types.OCILayer, History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "divert make image"}}); err != nil {
			return archImage{}, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return archImage{}, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	if arch == "arm64" {
		cf.Variant = "v8"
	}
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = f.Entrypoint
	cf.Config.Cmd = nil
	// debian:12-slim's PATH.
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	img, err = mutate.ConfigFile(img, cf)
	return archImage{arch: arch, img: img, pkgs: list}, err
}

// write replaces DIR/oci and DIR/divert-<arch>.tar.
func write(dir, ref string, imgs []archImage) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	ociDir := filepath.Join(dir, "oci")
	if err := os.RemoveAll(ociDir); err != nil {
		return err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, ai := range imgs {
		cf, err := ai.img.ConfigFile()
		if err != nil {
			return err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: ai.img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant}}})
		if err := tarball.WriteToFile(archivePath(dir, ai.arch), tag, ai.img); err != nil {
			return err
		}
	}
	idx = mutate.Annotations(idx, map[string]string{"org.opencontainers.image.ref.name": tag.String()}).(v1.ImageIndex)
	p, err := layout.Write(ociDir, empty.Index)
	if err != nil {
		return err
	}
	return p.AppendIndex(idx, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag.TagStr()}))
}

func archivePath(dir, arch string) string { return filepath.Join(dir, "divert-"+arch+".tar") }

func howTo(w io.Writer, dir, ref string, imgs []archImage) {
	for _, ai := range imgs {
		d, _ := ai.img.Digest()
		fmt.Fprintf(w, "linux/%s  %s  %s\n    packages: %s\n", ai.arch, archivePath(dir, ai.arch), d, strings.Join(ai.pkgs, " "))
	}
	a := archivePath(dir, imgs[0].arch)
	fmt.Fprintf(w, `
Load it (one architecture, tagged %[1]s):
    ctr -n k8s.io images import %[2]s        # containerd (Kubernetes nodes)
    docker load -i %[2]s
    podman load -i %[2]s
Push both architectures (one multi-platform index) from the OCI layout:
    crane push --index %[3]s %[1]s
    skopeo copy --all oci:%[3]s:%[4]s docker://%[1]s
`, ref, a, filepath.Join(dir, "oci"), tagOf(ref))
}

func tagOf(ref string) string {
	if t, err := name.NewTag(ref); err == nil {
		return t.TagStr()
	}
	return "latest"
}
