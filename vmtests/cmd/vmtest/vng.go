package main

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/meshdivert/divert/vmtests"
)

func runVng(ctx context.Context, r *vmRun, x *vmtests.Extracted, pkgs []vmtests.Package, bins map[string]string, initBin string, plan vmtests.Plan, console, results string, timeout time.Duration, stream *os.File) (bool, time.Duration, error) {
	return false, 0, errors.New("not yet")
}
