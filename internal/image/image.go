// Package image reads the repository's Dockerfile, so tests can build divert exactly as
// the image does (no Docker engine needed) and check what the image contains.
package image

import (
	"bufio"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// Instruction is one Dockerfile instruction with its continuation lines joined.
type Instruction struct {
	Stage int    // 0 for the first FROM's stage
	Cmd   string // upper case: FROM, RUN, COPY, ...
	Args  string
}

// Parse reads Dockerfile instructions (comments dropped, "\" continuations joined).
func Parse(path string) ([]Instruction, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Instruction
	stage := -1
	var cur strings.Builder
	flush := func() {
		line := strings.TrimSpace(cur.String())
		cur.Reset()
		if line == "" {
			return
		}
		cmd, args, _ := strings.Cut(line, " ")
		cmd = strings.ToUpper(cmd)
		if cmd == "FROM" {
			stage++
		}
		out = append(out, Instruction{Stage: stage, Cmd: cmd, Args: strings.TrimSpace(args)})
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if t := strings.TrimSpace(line); strings.HasPrefix(t, "#") {
			continue
		}
		if strings.HasSuffix(strings.TrimRight(line, " \t"), `\`) {
			cur.WriteString(strings.TrimSuffix(strings.TrimRight(line, " \t"), `\`) + " ")
			continue
		}
		cur.WriteString(line)
		flush()
	}
	flush()
	return out, sc.Err()
}

// Words splits a shell command line the way sh would for simple words: whitespace
// separates, single and double quotes group (no expansions).
func Words(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord := false
	var quote rune
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			w.WriteRune(r)
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated quote in %q", s)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words, nil
}

// BuildCommand is the image's `go build` step: the environment assignments before it, its
// arguments (after "go build"), the packages and the output directory (go build writes one
// binary per main package into it, named after the package's directory).
type BuildCommand struct {
	Env    []string // e.g. CGO_ENABLED=0
	Flags  []string // everything between "build" and the packages, -o and its value excluded
	OutDir string   // the -o value, a directory: it ends in "/"
	Pkgs   []string // e.g. ./cmd/divert ./cmd/divert-cni
}

// Binaries are the names of what the build writes into OutDir, in package order.
func (bc BuildCommand) Binaries() []string {
	var out []string
	for _, p := range bc.Pkgs {
		out = append(out, filepath.Base(p))
	}
	return out
}

// Run builds the packages from the module at root into dir, with the image's environment
// and flags.
func (bc BuildCommand) Run(root, dir string) error { return bc.RunEnv(root, dir) }

// RunEnv is Run with more environment (GOOS=linux GOARCH=arm64 to cross-compile), set
// after the image's own.
func (bc BuildCommand) RunEnv(root, dir string, env ...string) error {
	args := append(append([]string{"build"}, bc.Flags...), "-o", dir+"/")
	args = append(args, bc.Pkgs...)
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	cmd.Env = append(append(os.Environ(), bc.Env...), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s go %s: %v\n%s", strings.Join(append(bc.Env, env...), " "), strings.Join(args, " "), err, b)
	}
	return nil
}

// FindBuild returns the Dockerfile's single RUN line that runs go build.
func FindBuild(instrs []Instruction) (BuildCommand, error) {
	var found []string
	for _, in := range instrs {
		if in.Cmd == "RUN" && strings.Contains(in.Args, "go build") {
			found = append(found, in.Args)
		}
	}
	if len(found) != 1 {
		return BuildCommand{}, fmt.Errorf("want exactly one RUN ... go build line, found %d", len(found))
	}
	words, err := Words(found[0])
	if err != nil {
		return BuildCommand{}, err
	}
	var bc BuildCommand
	i := 0
	for ; i < len(words) && strings.Contains(words[i], "=") && !strings.HasPrefix(words[i], "-"); i++ {
		bc.Env = append(bc.Env, words[i])
	}
	if i+1 >= len(words) || words[i] != "go" || words[i+1] != "build" {
		return BuildCommand{}, fmt.Errorf("the build line must be [VAR=value ...] go build ...: %q", found[0])
	}
	rest := words[i+2:]
	for j := 0; j < len(rest); j++ {
		switch {
		case rest[j] == "-o" && j+1 < len(rest):
			bc.OutDir = rest[j+1]
			j++
		case strings.HasPrefix(rest[j], "-o="):
			bc.OutDir = strings.TrimPrefix(rest[j], "-o=")
		case strings.HasPrefix(rest[j], "./"):
			bc.Pkgs = append(bc.Pkgs, rest[j])
		default:
			bc.Flags = append(bc.Flags, rest[j])
		}
	}
	if len(bc.Pkgs) == 0 || !strings.HasSuffix(bc.OutDir, "/") {
		return BuildCommand{}, fmt.Errorf("the build line must end in -o DIR/ ./PACKAGE...: %q", found[0])
	}
	return bc, nil
}

// RepoRoot is the module root, found from this source file.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Divert builds the image's binaries with the Dockerfile's go build command (its environment
// and flags, into a directory every uid can read) once per test process and returns divert's
// path. divert-cni, divert-node and an "istio-iptables" link to divert sit beside it, as in
// the image.
func Divert(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() {
		root := RepoRoot()
		instrs, err := Parse(filepath.Join(root, "Dockerfile"))
		if err != nil {
			buildErr = err
			return
		}
		bc, err := FindBuild(instrs)
		if err != nil {
			buildErr = err
			return
		}
		// Helpers run as other uids (the proxy's, 1337) must be able to exec it: not in
		// t.TempDir, whose parent is 0700.
		if buildDir, err = os.MkdirTemp("", "divert-image-"); err == nil {
			err = os.Chmod(buildDir, 0o755)
		}
		if err != nil {
			buildErr = err
			return
		}
		if buildErr = bc.Run(root, buildDir); buildErr != nil {
			return
		}
		buildErr = os.Symlink("divert", filepath.Join(buildDir, "istio-iptables"))
	})
	if buildErr != nil {
		tb.Fatalf("build divert as the Dockerfile does: %v", buildErr)
	}
	return filepath.Join(buildDir, "divert")
}

// Cleanup removes what Divert built; call it from TestMain after m.Run.
func Cleanup() {
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
}

// IsStatic reports whether the ELF binary at path has no program interpreter and no
// dynamic section, i.e. runs without a C library.
func IsStatic(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			return false, nil
		}
	}
	return true, nil
}
