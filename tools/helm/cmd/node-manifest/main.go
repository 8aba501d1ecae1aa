// Command node-manifest writes deploy/node/divert-node.yaml from the chart (make manifests).
//
//	go run ./cmd/node-manifest -chart ../../deploy/helm/divert -out ../../deploy/node/divert-node.yaml
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshdivert/divert/tools/helm/nodemanifest"
)

func main() {
	chart := flag.String("chart", "", "the chart directory (deploy/helm/divert)")
	out := flag.String("out", "", "the manifest to write (deploy/node/divert-node.yaml)")
	flag.Parse()
	if *chart == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "node-manifest: pass -chart and -out")
		os.Exit(2)
	}
	b, err := nodemanifest.Render(*chart)
	if err == nil {
		err = os.MkdirAll(filepath.Dir(*out), 0o755)
	}
	if err == nil {
		err = os.WriteFile(*out, b, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "node-manifest:", err)
		os.Exit(1)
	}
}
