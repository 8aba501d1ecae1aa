package main

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"runtime/debug"
)

// moduleDir is the istio module's directory in the module cache: the version this binary
// was built with (its build info), as go mod download reports it.
func moduleDir() (string, error) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "", fmt.Errorf("no build info")
	}
	for _, d := range bi.Deps {
		if d.Path == "istio.io/istio" {
			out, err := exec.Command("go", "mod", "download", "-json", d.Path+"@"+d.Version).Output()
			if err != nil {
				return "", fmt.Errorf("go mod download %s@%s: %w", d.Path, d.Version, err)
			}
			var m struct{ Dir string }
			if err := json.Unmarshal(out, &m); err != nil || m.Dir == "" {
				return "", fmt.Errorf("go mod download printed no Dir: %s", out)
			}
			return m.Dir, nil
		}
	}
	return "", fmt.Errorf("istio.io/istio is not in this binary's build info")
}
