package loader

import "testing"

// Only kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (Debian's 5.10 does, 6.1 does
// not): there a missing CAP_SYS_RESOURCE is an error, elsewhere nothing to fix.
func TestChargesMemlock(t *testing.T) {
	for release, want := range map[string]bool{
		"5.10.0-35-amd64": true, "4.19.0": true, "5.11.0": false, "5.15.0-generic": false,
		"6.1.0-41-amd64": false, "6.18.44-fc-v1272": false, "10.0": false, "garbage": true,
	} {
		if got := chargesMemlock(release); got != want {
			t.Errorf("chargesMemlock(%q) = %v, want %v", release, got, want)
		}
	}
}
