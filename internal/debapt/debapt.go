// Package debapt runs apt-get and apt-cache with a private configuration under one
// directory: its own sources list, package lists, archive cache and an empty dpkg status,
// so the system's apt state is neither read for sources nor changed, and no foreign
// architecture is added to the system. Only the mirror hosts come from the system's
// sources (on CI machines they are the only Debian hosts that can be reached). make image
// (tools/image) fetches the image's packages with it, make vmtest the guests' kernels.
package debapt

import (
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Apt is one private apt configuration.
type Apt struct {
	Dir      string
	Arch     string // the one architecture apt resolves for; "" is the host's
	Mirror   string // e.g. http://deb.debian.org/debian
	Security string // e.g. http://deb.debian.org/debian-security
	Log      io.Writer
}

// New picks the mirrors: $<mirrorVar> and $<securityVar>, else the ones the system's apt
// sources use; the security mirror defaults to /debian-security on the main mirror's host.
func New(dir, arch, mirrorVar, securityVar string, log io.Writer) (*Apt, error) {
	a := &Apt{Dir: dir, Arch: arch, Mirror: os.Getenv(mirrorVar), Security: os.Getenv(securityVar), Log: log}
	if a.Mirror == "" || a.Security == "" {
		main, sec := systemMirrors()
		if a.Mirror == "" {
			a.Mirror = main
		}
		if a.Security == "" {
			a.Security = sec
		}
	}
	if a.Mirror == "" {
		return nil, fmt.Errorf("no Debian mirror in /etc/apt/sources.list{,.d}: set %s=http://<host>/debian", mirrorVar)
	}
	if a.Security == "" {
		u, err := url.Parse(a.Mirror)
		if err != nil {
			return nil, fmt.Errorf("$%s: %w", mirrorVar, err)
		}
		u.Path = "/debian-security"
		a.Security = u.String()
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

func (a *Apt) sourcesPath() string { return filepath.Join(a.Dir, "sources.list") }

// ArchivesDir is where apt-get keeps the .deb files it downloads for install.
func (a *Apt) ArchivesDir() string { return filepath.Join(a.Dir, "cache", "archives") }

// args are the -o options that make apt private to Dir.
func (a *Apt) args() []string {
	opts := [][2]string{
		{"Dir::Etc::SourceList", a.sourcesPath()},
		{"Dir::Etc::SourceParts", filepath.Join(a.Dir, "sources.list.d")},
		{"Dir::Etc::PreferencesParts", filepath.Join(a.Dir, "preferences.d")},
		{"Dir::Etc::Preferences", filepath.Join(a.Dir, "preferences")},
		{"Dir::State::Lists", filepath.Join(a.Dir, "lists")},
		{"Dir::State::status", filepath.Join(a.Dir, "status")},
		{"Dir::Cache", filepath.Join(a.Dir, "cache")},
		{"APT::Sandbox::User", "root"}, // _apt cannot write into a root-owned cache dir
		{"Acquire::Languages", "none"},
		{"APT::Install-Recommends", "false"},
		// --download-only install would otherwise take the system's dpkg lock, which
		// a running apt on the host holds; nothing here touches the system's dpkg.
		{"Debug::NoLocking", "true"},
	}
	if a.Arch != "" {
		opts = append(opts, [2]string{"APT::Architecture", a.Arch}, [2]string{"APT::Architectures", a.Arch})
	}
	var args []string
	for _, kv := range opts {
		args = append(args, "-o", kv[0]+"="+kv[1])
	}
	return args
}

// Setup writes the private configuration for the suites (Debian's, e.g. bookworm,
// bookworm-security) and reports whether the package lists must be fetched: first use,
// or the sources changed.
func (a *Apt) Setup(suites []string) (stale bool, err error) {
	for _, d := range []string{"sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(a.Dir, d), 0o755); err != nil {
			return false, err
		}
	}
	if err := os.WriteFile(filepath.Join(a.Dir, "status"), nil, 0o644); err != nil {
		return false, err
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
	lists, _ := filepath.Glob(filepath.Join(a.Dir, "lists", "*_Packages*"))
	if string(old) == b.String() && len(lists) > 0 {
		return false, nil
	}
	return true, os.WriteFile(a.sourcesPath(), []byte(b.String()), 0o644)
}

// Update refreshes the private package lists.
func (a *Apt) Update() error { return a.Run("", "apt-get", "-q", "update") }

// Download fetches one pkg=version into dir.
func (a *Apt) Download(dir, pkgVersion string) error {
	return a.Run(dir, "apt-get", "-q", "download", pkgVersion)
}

// Command is name (apt-get or apt-cache) with the private configuration and args.
func (a *Apt) Command(name string, args ...string) *exec.Cmd {
	return exec.Command(name, append(a.args(), args...)...)
}

// Output runs apt-get or apt-cache under the private configuration and returns its
// standard output; its standard error is part of the error.
func (a *Apt) Output(name string, args ...string) ([]byte, error) {
	c := a.Command(name, args...)
	var errb strings.Builder
	c.Stderr = &errb
	out, err := c.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s%s: %w\n%s", name, strings.Join(args, " "), a.archNote(), err, errb.String())
	}
	return out, nil
}

// Run runs apt-get or apt-cache under the private configuration in dir, its output going
// to the log.
func (a *Apt) Run(dir, name string, args ...string) error {
	c := a.Command(name, args...)
	c.Dir = dir
	c.Stdout, c.Stderr = a.Log, a.Log
	if err := c.Run(); err != nil {
		return fmt.Errorf("%s %s%s: %w", name, strings.Join(args, " "), a.archNote(), err)
	}
	return nil
}

func (a *Apt) archNote() string {
	if a.Arch == "" {
		return ""
	}
	return " (" + a.Arch + ")"
}
