package iptables

import "testing"

// istio's --force-iptables-binary names a binary; its name says the backend, or nothing.
func TestBackendOfBinary(t *testing.T) {
	for path, want := range map[string]Backend{
		"iptables-nft": BackendNFT, "/usr/sbin/iptables-legacy": BackendLegacy, "ip6tables-legacy-restore": BackendLegacy,
		"/sbin/iptables-nft-save": BackendNFT, "iptables": BackendAuto, "/usr/legacy/iptables": BackendAuto,
	} {
		got, ok := BackendOfBinary(path)
		if got != want || ok != (want != BackendAuto) {
			t.Errorf("%s: %q %v, want %q", path, got, ok, want)
		}
	}
}
