// Command gen writes divert's manifests (make manifests): every YAML file under -in with
// divert's image (a repository named divert) set to -image, into -out (the same directory
// by default), the IstioOperator generated from the injection template, and the Helm
// chart's default image (values.yaml's image.repository, Chart.yaml's appVersion and
// version). The chart's templates are copied as they are; deploy/node/divert-node.yaml is
// rendered from the chart afterwards by tools/helm (make manifests runs both).
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
	if _, _, ok := manifests.SplitImage(*image); !ok && *image != "" {
		fmt.Fprintf(os.Stderr, "gen: -image %q: name a tag (repository:version): it becomes the Helm chart's appVersion\n", *image)
		os.Exit(2)
	}
	absIn, _ := filepath.Abs(*in)
	absOut, _ := filepath.Abs(*out)
	if *image == "" || (absOut == absIn && !manifests.IsDivert(*image)) {
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
	repo, tag, _ := manifests.SplitImage(image)
	err := filepath.WalkDir(in, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(in, p)
		if err != nil || rel == manifests.OperatorPath {
			return err
		}
		inChart := strings.HasPrefix(rel, filepath.Dir(manifests.ChartPath)+string(filepath.Separator))
		if !inChart && !strings.HasSuffix(p, ".yaml") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		switch {
		case rel == manifests.ChartPath:
			b = manifests.SetChartVersion(b, tag)
		case rel == manifests.ValuesPath:
			b = manifests.SetChartRepository(b, repo)
		case !inChart: // the chart's templates are Go templates, not manifests
			b = manifests.SetImage(b, image)
		}
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
