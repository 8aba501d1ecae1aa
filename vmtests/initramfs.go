package vmtests

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Initramfs is a newc cpio archive being assembled. Entries are written in the order they
// were added; adding a path adds its parent directories first, which is what the kernel's
// unpacker needs. The archive is not compressed: decompressing ~100 MB under TCG costs
// more than reading it uncompressed.
type Initramfs struct {
	entries map[string]*entry
	order   []string
}

type entry struct {
	mode   uint32 // type and permission bits, as in stat(2)
	src    string // regular file: host file to copy, or
	data   []byte // its contents
	target string // symlink
	rdev   [2]uint32
}

const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFLNK = 0o120000
	sIFCHR = 0o020000
)

func NewInitramfs() *Initramfs { return &Initramfs{entries: map[string]*entry{}} }

func (r *Initramfs) add(path string, e *entry) {
	path = filepath.Clean("/" + path)
	if path == "/" {
		return
	}
	if _, ok := r.entries[path]; ok {
		return // first one wins: host symlinks and directories are mirrored only once
	}
	if parent := filepath.Dir(path); parent != "/" {
		if _, ok := r.entries[parent]; !ok {
			r.Dir(parent, 0o755)
		}
	}
	r.entries[path] = e
	r.order = append(r.order, path)
}

// Dir adds a directory.
func (r *Initramfs) Dir(path string, perm fs.FileMode) {
	r.add(path, &entry{mode: sIFDIR | uint32(perm.Perm()) | stickyBit(perm)})
}

func stickyBit(m fs.FileMode) uint32 {
	if m&fs.ModeSticky != 0 {
		return 0o1000
	}
	return 0
}

// Bytes adds a regular file with the given contents.
func (r *Initramfs) Bytes(path string, data []byte, perm fs.FileMode) {
	r.add(path, &entry{mode: sIFREG | uint32(perm.Perm()), data: data})
}

// File adds a regular file copied from the host file src.
func (r *Initramfs) File(path, src string, perm fs.FileMode) {
	r.add(path, &entry{mode: sIFREG | uint32(perm.Perm()), src: src})
}

// Symlink adds a symbolic link.
func (r *Initramfs) Symlink(path, target string) {
	r.add(path, &entry{mode: sIFLNK | 0o777, target: target})
}

// CharDev adds a character device node.
func (r *Initramfs) CharDev(path string, major, minor uint32, perm fs.FileMode) {
	r.add(path, &entry{mode: sIFCHR | uint32(perm.Perm()), rdev: [2]uint32{major, minor}})
}

// HostPath copies a host file or directory tree to the same path in the archive, mirroring
// every symlink on the way (Debian's /lib -> usr/lib, /etc/alternatives, ...) so programs
// find each other under the names they use on the host.
func (r *Initramfs) HostPath(p string) error {
	return r.hostPath(filepath.Clean(p), 0)
}

func (r *Initramfs) hostPath(p string, depth int) error {
	if depth > 40 {
		return fmt.Errorf("%s: too many levels of symbolic links", p)
	}
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	cur := "/"
	for i, comp := range parts {
		next := filepath.Join(cur, comp)
		fi, err := os.Lstat(next)
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(next)
			if err != nil {
				return err
			}
			r.Symlink(next, t)
			if !filepath.IsAbs(t) {
				t = filepath.Join(cur, t)
			}
			return r.hostPath(filepath.Join(append([]string{t}, parts[i+1:]...)...), depth+1)
		case fi.IsDir():
			r.Dir(next, fi.Mode())
			cur = next
			if i == len(parts)-1 {
				ents, err := os.ReadDir(next)
				if err != nil {
					return err
				}
				for _, e := range ents {
					if err := r.hostPath(filepath.Join(next, e.Name()), depth); err != nil {
						return err
					}
				}
			}
		case fi.Mode().IsRegular():
			r.File(next, next, fi.Mode())
		default:
			return fmt.Errorf("%s: unsupported file type %v", next, fi.Mode().Type())
		}
	}
	return nil
}

// HostProgram adds a host executable (found in PATH or an sbin directory) with its shared
// libraries and ELF interpreter, as ldd lists them.
func (r *Initramfs) HostProgram(name string) error {
	p := name
	if !filepath.IsAbs(name) {
		var err error
		if p, err = lookPath(name); err != nil {
			return err
		}
	}
	if err := r.HostPath(p); err != nil {
		return err
	}
	return r.SharedLibs(p)
}

func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/local/sbin", "/usr/sbin", "/sbin"} {
		if fi, err := os.Stat(filepath.Join(d, name)); err == nil && fi.Mode()&0o111 != 0 {
			return filepath.Join(d, name), nil
		}
	}
	return "", fmt.Errorf("%s not found on the host (install it: vmtests/deps.sh)", name)
}

// SharedLibs adds what ldd says the ELF file at p loads. Static files have none.
func (r *Initramfs) SharedLibs(p string) error {
	out, err := exec.Command("ldd", p).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "not a dynamic executable") || strings.Contains(string(out), "statically linked") {
			return nil
		}
		return fmt.Errorf("ldd %s: %v: %s", p, err, out)
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
		// "linux-vdso.so.1 (0x...)" (in the kernel, nothing to copy).
		line := strings.TrimSpace(sc.Text())
		if strings.Contains(line, "not found") {
			return fmt.Errorf("ldd %s: %s", p, line)
		}
		if _, after, ok := strings.Cut(line, "=>"); ok {
			line = strings.TrimSpace(after)
		}
		lib, _, _ := strings.Cut(line, " ")
		if strings.HasPrefix(lib, "/") {
			if err := r.HostPath(lib); err != nil {
				return err
			}
		}
	}
	return sc.Err()
}

// WriteTo writes the archive in the newc format (see the kernel's
// Documentation/driver-api/early-userspace/buffer-format.rst).
func (r *Initramfs) WriteTo(w io.Writer) (int64, error) {
	cw := &countWriter{w: w}
	for i, path := range r.order {
		if err := r.writeEntry(cw, uint32(i+1), path); err != nil {
			return cw.n, err
		}
	}
	if err := writeHeader(cw, 0, 0, 0, [2]uint32{}, "TRAILER!!!"); err != nil {
		return cw.n, err
	}
	return cw.n, pad(cw)
}

func (r *Initramfs) writeEntry(cw *countWriter, ino uint32, path string) error {
	e := r.entries[path]
	var body io.Reader
	var size int64
	switch {
	case e.mode&0o170000 == sIFLNK:
		body, size = strings.NewReader(e.target), int64(len(e.target))
	case e.src != "":
		f, err := os.Open(e.src)
		if err != nil {
			return err
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		body, size = f, fi.Size()
	case e.data != nil:
		body, size = bytes.NewReader(e.data), int64(len(e.data))
	}
	if err := writeHeader(cw, ino, e.mode, size, e.rdev, strings.TrimPrefix(path, "/")); err != nil {
		return err
	}
	if body != nil {
		if n, err := io.Copy(cw, body); err != nil || n != size {
			return fmt.Errorf("copy %s: %d of %d bytes: %v", path, n, size, err)
		}
	}
	return pad(cw)
}

func writeHeader(w *countWriter, ino, mode uint32, size int64, rdev [2]uint32, name string) error {
	// magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
	// rdevminor, namesize (with NUL), check; then the name, NUL, padding to 4 bytes.
	if _, err := fmt.Fprintf(w, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%s\x00",
		ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(name)+1, 0, name); err != nil {
		return err
	}
	return pad(w)
}

func pad(w *countWriter) error {
	if n := w.n % 4; n != 0 {
		_, err := w.Write(make([]byte, 4-n))
		return err
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Tree copies the host directory src to dst in the archive (regular files, directories and
// symlinks as they are).
func (r *Initramfs) Tree(dst, src string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			r.Dir(to, fi.Mode())
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			r.Symlink(to, t)
		case fi.Mode().IsRegular():
			r.File(to, p, fi.Mode())
		}
		return nil
	})
}
