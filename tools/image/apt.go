package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// apt runs apt-get with a private configuration under dir, for one architecture: its own
// sources list, package lists, archive cache and an empty dpkg status, so the system's
// apt state is neither read for sources nor changed and no foreign architecture is added
// to the system (vmtests/kernels.go does the same for kernels). Only the mirror hosts come
// from the system's sources.
type apt struct {
	dir, arch        string
	mirror, security string
	log              io.Writer
}

// suites are Debian 12's, as debian:12-slim's apt sources list them.
var suites = []string{"bookworm", "bookworm-updates", "bookworm-security"}

func newApt(dir, arch string, log io.Writer) (*apt, error) {
	a := &apt{dir: dir, arch: arch, log: log,
		mirror: os.Getenv("DIVERT_IMAGE_MIRROR"), security: os.Getenv("DIVERT_IMAGE_SECURITY_MIRROR")}
	if a.mirror == "" || a.security == "" {
		m, s := systemMirrors()
		if a.mirror == "" {
			a.mirror = m
		}
		if a.security == "" {
			a.security = s
		}
	}
	if a.mirror == "" {
		return nil, errors.New("no Debian mirror in /etc/apt/sources.list{,.d}: set DIVERT_IMAGE_MIRROR=http://<host>/debian")
	}
	if a.security == "" {
		u, err := url.Parse(a.mirror)
		if err != nil {
			return nil, err
		}
		u.Path = "/debian-security"
		a.security = u.String()
	}
	return a, nil
}

// systemMirrors returns the first .../debian and .../debian-security URIs of the system's
// one-line (.list) or deb822 (.sources) apt sources.
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

func (a *apt) args() []string {
	var args []string
	for _, kv := range [][2]string{
		{"APT::Architecture", a.arch},
		{"APT::Architectures", a.arch},
		{"Dir::Etc::SourceList", filepath.Join(a.dir, "sources.list")},
		{"Dir::Etc::SourceParts", filepath.Join(a.dir, "sources.list.d")},
		{"Dir::Etc::PreferencesParts", filepath.Join(a.dir, "preferences.d")},
		{"Dir::Etc::Preferences", filepath.Join(a.dir, "preferences")},
		{"Dir::State::Lists", filepath.Join(a.dir, "lists")},
		{"Dir::State::status", filepath.Join(a.dir, "status")},
		{"Dir::Cache", filepath.Join(a.dir, "cache")},
		{"APT::Sandbox::User", "root"},
		{"Acquire::Languages", "none"},
		{"APT::Install-Recommends", "false"},
		{"Debug::NoLocking", "true"},
	} {
		args = append(args, "-o", kv[0]+"="+kv[1])
	}
	return args
}

// setup writes the private configuration; it reports whether the package lists must be
// fetched (first use, or the sources changed).
func (a *apt) setup() (stale bool, err error) {
	for _, d := range []string{"sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(a.dir, d), 0o755); err != nil {
			return false, err
		}
	}
	if err := os.WriteFile(filepath.Join(a.dir, "status"), nil, 0o644); err != nil {
		return false, err
	}
	var b strings.Builder
	for _, s := range suites {
		uri := a.mirror
		if strings.HasSuffix(s, "-security") {
			uri = a.security
		}
		fmt.Fprintf(&b, "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n", uri, s)
	}
	p := filepath.Join(a.dir, "sources.list")
	old, _ := os.ReadFile(p)
	lists, _ := filepath.Glob(filepath.Join(a.dir, "lists", "*_Packages*"))
	if string(old) == b.String() && len(lists) > 0 {
		return false, nil
	}
	return true, os.WriteFile(p, []byte(b.String()), 0o644)
}

func (a *apt) cmd(name string, args ...string) *exec.Cmd {
	return exec.Command(name, append(a.args(), args...)...)
}

func (a *apt) update() error {
	c := a.cmd("apt-get", "-q", "update")
	c.Stdout, c.Stderr = a.log, a.log
	if err := c.Run(); err != nil {
		return fmt.Errorf("apt-get update (%s): %w", a.arch, err)
	}
	return nil
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
	c := a.cmd("apt-get", append([]string{"-s", "-q", "install"}, names...)...)
	var errb bytes.Buffer
	c.Stderr = &errb
	out, err := c.Output()
	if err != nil {
		return nil, fmt.Errorf("apt-get -s install %s (%s): %v\n%s", strings.Join(names, " "), a.arch, err, errb.Bytes())
	}
	var pkgs []pkg
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := instLine.FindStringSubmatch(sc.Text()); m != nil {
			pkgs = append(pkgs, pkg{Name: m[1], Version: m[2], Arch: m[3]})
		}
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("apt-get -s install %s (%s) installs nothing:\n%s", strings.Join(names, " "), a.arch, out)
	}
	sort.Slice(pkgs, func(i, j int) bool { return pkgs[i].Name < pkgs[j].Name })
	return pkgs, nil
}

// fetch resolves names and downloads what the archive cache lacks; it returns the .deb
// paths, one per package of the closure.
func (a *apt) fetch(names []string) ([]pkg, []string, error) {
	stale, err := a.setup()
	if err != nil {
		return nil, nil, err
	}
	if stale {
		if err := a.update(); err != nil {
			return nil, nil, err
		}
	}
	pkgs, err := a.resolve(names)
	if err != nil && !stale {
		// a package the lists no longer name: fetch them again
		if err = a.update(); err == nil {
			pkgs, err = a.resolve(names)
		}
	}
	if err != nil {
		return nil, nil, err
	}
	arch := filepath.Join(a.dir, "cache", "archives")
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
		c := a.cmd("apt-get", append([]string{"-q", "-y", "--download-only", "install"}, names...)...)
		c.Stdout, c.Stderr = a.log, a.log
		if err := c.Run(); err != nil {
			return nil, nil, fmt.Errorf("apt-get --download-only install (%s): %w", a.arch, err)
		}
	}
	for _, d := range debs {
		if _, err := os.Stat(d); err != nil {
			return nil, nil, fmt.Errorf("apt-get left no %s", d)
		}
	}
	return pkgs, debs, nil
}
