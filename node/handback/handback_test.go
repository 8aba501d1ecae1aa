package handback_test

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/meshdivert/divert/iptables"
	"github.com/meshdivert/divert/loader"
	"github.com/meshdivert/divert/node/handback"
	"github.com/meshdivert/divert/test/divertest"
	"github.com/meshdivert/divert/test/testpod"
)

func TestMain(m *testing.M) {
	testpod.RunHelperIfRequested()
	os.Exit(m.Run())
}

// A pod whose maps cannot give back the policy istio's rules need (TPROXY: they hold no
// mark or route table) is refused with one line, and stays as it was: captured by divert,
// no iptables rule written.
func TestHandBackRefusesTPROXY(t *testing.T) {
	pod := testpod.New(t)
	opts := divertest.BPFFS(t)
	probe := divertest.NewCrashProbe(t, pod)
	divertest.Attach(t, pod, opts, divertest.Config(t, "-m", "TPROXY"))
	var results []handback.Result
	err := handback.Run(context.Background(), handback.Options{Loader: opts, CgroupRoot: "/sys/fs/cgroup"},
		func(r handback.Result) { results = append(results, r) })
	if err == nil || len(results) != 1 || results[0].Err == nil || !strings.Contains(results[0].Err.Error(), "TPROXY") ||
		strings.Contains(results[0].Err.Error(), "\n") {
		t.Fatalf("want the TPROXY pod refused in one line naming TPROXY: %v %+v", err, results)
	}
	if ids, _ := loader.List(opts); len(ids) != 1 {
		t.Fatalf("the refused pod lost its pins: %v", ids)
	}
	if b, err := iptables.Installed(context.Background(), pod.NetNSPath); err != nil || len(b) != 0 {
		t.Fatalf("the refused pod got iptables rules: %v %v", b, err)
	}
	if captured, err := probe.Captured(t); err != nil || !captured {
		t.Fatalf("the refused pod is no longer captured: %v %v", captured, err)
	}
}
