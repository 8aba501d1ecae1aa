// Package version says which divert this is.
package version

import (
	"fmt"
	"runtime"

	"github.com/meshdivert/divert/bpf"
)

// Version is divert's release; the Makefile's VERSION (the image tag) must equal it, which
// deploy's tests check.
const Version = "0.1.0"

// String is what `divert --version` prints: the release, the programs it attaches (their
// object's hash) and the Go that built it.
func String() string {
	return fmt.Sprintf("divert %s (programs %s, %s)", Version, bpf.ObjectID(), runtime.Version())
}
