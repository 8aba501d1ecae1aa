package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/meshdivert/divert/internal/debapt"
)

// apt fetches the image's packages for one architecture with a private apt
// configuration (internal/debapt, which make vmtest uses for kernels too).
type apt struct{ *debapt.Apt }

// suites are Debian 12's, as debian:12-slim's apt sources list them.
var suites = []string{"bookworm", "bookworm-updates", "bookworm-security"}

func newApt(dir, arch string, log io.Writer) (*apt, error) {
	a, err := debapt.New(dir, arch, "DIVERT_IMAGE_MIRROR", "DIVERT_IMAGE_SECURITY_MIRROR", log)
	if err != nil {
		return nil, err
	}
	return &apt{a}, nil
}

// pkg is one package of the closure, as apt resolved it.
type pkg struct{ Name, Version, Arch string }

// deb is the file name apt-get gives the package in its archive cache.
func (p pkg) deb() string {
	return p.Name + "_" + strings.ReplaceAll(p.Version, ":", "%3a") + "_" + p.Arch + ".deb"
}

// instLine is apt-get -s install's line for one package:
// Inst libgcc-s1 (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64]) []
var instLine = regexp.MustCompile(`^Inst (\S+) \((\S+) [^\[]*\[([a-z0-9]+)\]\)`)

// resolve is what `apt-get install --no-install-recommends names` installs on an empty
// system: the packages and everything they depend on.
func (a *apt) resolve(names []string) ([]pkg, error) {
	out, err := a.Output("apt-get", append([]string{"-s", "-q", "install"}, names...)...)
	if err != nil {
		return nil, err
	}
	var pkgs []pkg
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := instLine.FindStringSubmatch(sc.Text()); m != nil {
			pkgs = append(pkgs, pkg{Name: m[1], Version: m[2], Arch: m[3]})
		}
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("apt-get -s install %s (%s) installs nothing:\n%s", strings.Join(names, " "), a.Arch, out)
	}
	sort.Slice(pkgs, func(i, j int) bool { return pkgs[i].Name < pkgs[j].Name })
	return pkgs, nil
}

// fetch resolves names and downloads what the archive cache lacks; it returns the .deb
// paths, one per package of the closure.
func (a *apt) fetch(names []string) ([]pkg, []string, error) {
	stale, err := a.Setup(suites)
	if err != nil {
		return nil, nil, err
	}
	if stale {
		if err := a.Update(); err != nil {
			return nil, nil, err
		}
	}
	pkgs, err := a.resolve(names)
	if err != nil && !stale {
		// a package the lists no longer name: fetch them again
		if err = a.Update(); err == nil {
			pkgs, err = a.resolve(names)
		}
	}
	if err != nil {
		return nil, nil, err
	}
	arch := a.ArchivesDir()
	var debs []string
	var missing []string
	for _, p := range pkgs {
		d := filepath.Join(arch, p.deb())
		debs = append(debs, d)
		if _, err := os.Stat(d); err != nil {
			missing = append(missing, p.Name+"="+p.Version)
		}
	}
	if len(missing) > 0 {
		if err := a.Run("", "apt-get", append([]string{"-q", "-y", "--download-only", "install"}, names...)...); err != nil {
			return nil, nil, err
		}
	}
	for _, d := range debs {
		if _, err := os.Stat(d); err != nil {
			return nil, nil, fmt.Errorf("apt-get left no %s", d)
		}
	}
	return pkgs, debs, nil
}
