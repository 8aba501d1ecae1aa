// Package after is a vmtests self-test: it passes, but runs after crash has brought the
// guest down, so the runner must report it as failed (no result line), never as passed.
package after

import "testing"

func TestPasses(t *testing.T) {}
