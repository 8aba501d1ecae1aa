package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"sort"
	"strings"
	"time"
)

// epoch fixes every mtime and the image's creation time: the same inputs give the same
// digests.
var epoch = time.Unix(0, 0).UTC()

// entry is one file of a layer.
type entry struct {
	hdr  tar.Header
	data []byte
}

// tree is a layer's contents by path (no leading "/", directories without a trailing one).
type tree map[string]*entry

func (t tree) dir(p string, mode int64) {
	for d := p; d != "." && d != "/" && d != ""; d = path.Dir(d) {
		if _, ok := t[d]; !ok {
			t[d] = &entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode}}
		}
		mode = 0o755
	}
}

func (t tree) file(p string, mode int64, data []byte) {
	p = strings.TrimPrefix(p, "/")
	t.dir(path.Dir(p), 0o755)
	t[p] = &entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(data))}, data: data}
}

func (t tree) link(p, target string) {
	p = strings.TrimPrefix(p, "/")
	t.dir(path.Dir(p), 0o755)
	t[p] = &entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: p, Linkname: target, Mode: 0o777}}
}

// usrMerged are the top-level directories that are links into /usr on Debian 12 (merged
// /usr, as in debian:12-slim): a package's /lib/x/y lands in /usr/lib/x/y.
var usrMerged = []string{"bin", "sbin", "lib", "lib64"}

// dropped are the paths debian:12-slim's dpkg configuration excludes (documentation
// except the copyright files, manuals, translations).
func dropped(p string) bool {
	if rest, ok := strings.CutPrefix(p, "usr/share/doc/"); ok {
		return !strings.HasSuffix(rest, "/copyright") && strings.Contains(rest, "/")
	}
	for _, d := range []string{"usr/share/man", "usr/share/info", "usr/share/groff", "usr/share/lintian", "usr/share/linda", "usr/share/locale"} {
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}

func merged(p string) string {
	for _, d := range usrMerged {
		if p == d || strings.HasPrefix(p, d+"/") {
			return "usr/" + p
		}
	}
	return p
}

// addPackage adds a package's data (the tar stream dpkg-deb --fsys-tarfile prints) to t.
func (t tree) addPackage(r io.Reader) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := strings.Trim(path.Clean("/"+h.Name), "/")
		if p == "" || dropped(p) {
			continue
		}
		p = merged(p)
		e := &entry{hdr: tar.Header{Typeflag: h.Typeflag, Name: p, Mode: h.Mode, Linkname: h.Linkname}}
		switch h.Typeflag {
		case tar.TypeDir:
			if old, ok := t[p]; ok && old.hdr.Typeflag == tar.TypeDir {
				continue
			}
			e.hdr.Name = p + "/"
		case tar.TypeReg:
			if e.data, err = io.ReadAll(tr); err != nil {
				return err
			}
			e.hdr.Size = int64(len(e.data))
		case tar.TypeSymlink:
		case tar.TypeLink:
			e.hdr.Linkname = merged(strings.Trim(path.Clean("/"+h.Linkname), "/"))
		default:
			return fmt.Errorf("%s: unexpected tar entry type %c", h.Name, h.Typeflag)
		}
		t.dir(path.Dir(p), 0o755)
		t[p] = e
	}
}

// debData runs dpkg-deb --fsys-tarfile and returns a package's data archive, and its
// control fields (dpkg-deb -f).
func debData(deb string) (data, control []byte, err error) {
	var errb bytes.Buffer
	c := exec.Command("dpkg-deb", "--fsys-tarfile", deb)
	c.Stderr = &errb
	if data, err = c.Output(); err != nil {
		return nil, nil, fmt.Errorf("dpkg-deb --fsys-tarfile %s: %v: %s", deb, err, errb.Bytes())
	}
	c = exec.Command("dpkg-deb", "-f", deb)
	c.Stderr = &errb
	if control, err = c.Output(); err != nil {
		return nil, nil, fmt.Errorf("dpkg-deb -f %s: %v: %s", deb, err, errb.Bytes())
	}
	return data, control, nil
}

// alternatives are the links iptables' postinst makes with update-alternatives (the nft
// variant has the higher priority, 20, so it is what iptables runs on Debian 12).
var alternatives = []string{"iptables", "ip6tables", "arptables", "ebtables"}

// finishBase does what installing the packages on debian:12-slim does beyond unpacking
// them: the merged-/usr links, /tmp and /run, the alternatives iptables' postinst
// installs, and a dpkg status entry per package (distroless-style, status.d) so image
// scanners know what the image holds.
func (t tree) finishBase(controls map[string][]byte) {
	for _, d := range usrMerged {
		if _, ok := t["usr/"+d]; ok {
			delete(t, d)
			t.link(d, "usr/"+d)
		}
	}
	t.dir("tmp", 0o1777)
	t.dir("run", 0o755)
	for _, a := range alternatives {
		for _, s := range []string{"", "-restore", "-save"} {
			nft := "usr/sbin/" + a + "-nft" + s
			if _, ok := t[nft]; !ok {
				continue
			}
			t.link("etc/alternatives/"+a+s, "/"+nft)
			t.link("usr/sbin/"+a+s, "/etc/alternatives/"+a+s)
		}
	}
	names := make([]string, 0, len(controls))
	for n := range controls {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		c := bytes.TrimRight(controls[n], "\n")
		c = append(c, "\nStatus: install ok installed\n"...)
		t.file("var/lib/dpkg/status.d/"+n, 0o644, c)
	}
}

// tarball writes t, sorted, as a gzip-compressed layer; every entry owned by root with
// mtime 0. gzip once here: go-containerregistry takes a compressed opener as is.
func (t tree) tarball() ([]byte, error) {
	names := make([]string, 0, len(t))
	for n := range t {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	tw := tar.NewWriter(zw)
	for _, n := range names {
		e := t[n]
		h := e.hdr
		h.ModTime, h.Uid, h.Gid, h.Uname, h.Gname = epoch, 0, 0, "", ""
		if err := tw.WriteHeader(&h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func readFile(p string) ([]byte, int64, error) {
	st, err := os.Stat(p)
	if err != nil {
		return nil, 0, err
	}
	b, err := os.ReadFile(p)
	return b, int64(st.Mode().Perm()), err
}
