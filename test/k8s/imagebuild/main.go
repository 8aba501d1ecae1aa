// Command imagebuild builds divert's binaries exactly as the repository's Dockerfile does
// (its single `RUN ... go build ...` line: environment, flags, packages), into -o, for the
// Kubernetes e2e suite's divert image. It reads the Dockerfile with the same parser the
// initmode tests use, so the cluster runs the very binary the image would carry.
//
//	go run ./test/k8s/imagebuild -o DIR    # writes DIR/divert, DIR/divert-cni, DIR/divert-node
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshdivert/divert/internal/image"
)

func main() {
	out := flag.String("o", "", "directory to write the binary to")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "imagebuild: -o DIR is required")
		os.Exit(2)
	}
	if err := build(*out); err != nil {
		fmt.Fprintln(os.Stderr, "imagebuild:", err)
		os.Exit(1)
	}
}

func build(dir string) error {
	root := image.RepoRoot()
	instrs, err := image.Parse(filepath.Join(root, "Dockerfile"))
	if err != nil {
		return err
	}
	bc, err := image.FindBuild(instrs)
	if err != nil {
		return err
	}
	dst, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	return bc.Run(root, dst)
}
