// Command gen writes divert's manifests (make manifests): every YAML file under -in with
// divert's image (a repository named divert) set to -image, into -out (the same directory
// by default), and the IstioOperator generated from the injection template.
//
//	go run ./internal/manifests/gen -image ghcr.io/meshdivert/divert:0.1.0 -in deploy -out deploy
package main

import (
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshdivert/divert/internal/manifests"
)

func main() {
	image := flag.String("image", "", "divert's image reference, e.g. ghcr.io/meshdivert/divert:0.1.0")
	in := flag.String("in", "deploy", "the manifests to read")
	out := flag.String("out", "", "where to write them (default: -in, in place)")
	flag.Parse()
	if *out == "" {
		*out = *in
	}
	// In place, the name must stay recognisable as divert's for the next run to find it;
	// a copy elsewhere may name the image anything.
	if *image == "" || (filepath.Clean(*out) == filepath.Clean(*in) && !manifests.IsDivert(*image)) {
		fmt.Fprintf(os.Stderr, "gen: -image %q: pass divert's image reference; in place (-out = -in) its repository must be named divert (e.g. ghcr.io/meshdivert/divert:0.1.0), in a copy (OUT=dir) anything goes\n", *image)
		os.Exit(2)
	}
	if err := run(*image, *in, *out); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func run(image, in, out string) error {
	write := func(rel string, b []byte) error {
		p := filepath.Join(out, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		return os.WriteFile(p, b, 0o644)
	}
	err := filepath.WalkDir(in, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".yaml") {
			return err
		}
		rel, err := filepath.Rel(in, p)
		if err != nil || rel == manifests.OperatorPath {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		b = manifests.SetImage(b, image)
		if rel == manifests.TemplatePath {
			if err := write(manifests.OperatorPath, manifests.Operator(b)); err != nil {
				return err
			}
		}
		return write(rel, b)
	})
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(out, manifests.OperatorPath)); err != nil {
		return fmt.Errorf("no %s under %s to make %s from", manifests.TemplatePath, in, manifests.OperatorPath)
	}
	return nil
}
