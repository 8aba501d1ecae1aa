package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// A pod's Kubernetes name, where whoever attached it knew it (the node agent from the API,
// the init container from the downward API's $POD_NAMESPACE and $POD_NAME), is kept in its
// pin directory as a symlink whose target is "namespace/name": bpffs holds directories, pins
// and symlinks, no regular files. It comes and goes with the pins (Attach's rename, Detach's
// removal), so status never shows a name for a pod that is not attached.
const (
	// PodNamePin is the pod name's entry in a pin directory, beside the maps and links.
	PodNamePin    = "pod_name"
	podNameNewPin = "pod_name_new" // bpffs refuses '.' in names: no "pod_name.tmp"
)

// validPodName says whether name is "namespace/name": a namespace is a DNS label, a pod name
// a DNS subdomain (Kubernetes' rules). By hand, as validID.
func validPodName(name string) bool {
	ns, pod, ok := strings.Cut(name, "/")
	return ok && dnsName(ns, 63, false) && dnsName(pod, 253, true)
}

// dnsName: 1 to max lower-case letters, digits and '-' (and '.' if dots), a letter or digit at
// both ends.
func dnsName(s string, max int, dots bool) bool {
	if len(s) == 0 || len(s) > max || !isLowerAlnum(s[0]) || !isLowerAlnum(s[len(s)-1]) {
		return false
	}
	for i := range len(s) {
		if c := s[i]; !isLowerAlnum(c) && c != '-' && (!dots || c != '.') {
			return false
		}
	}
	return true
}

func isLowerAlnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }

// CheckPodName reports whether name is a Kubernetes "namespace/name".
func CheckPodName(name string) error {
	if !validPodName(name) {
		return &InputError{Field: "pod-name", Value: name, Msg: "use the pod's namespace/name, like default/web-0"}
	}
	return nil
}

// writePodName sets the pod name in pin directory dir, replacing any (rename is atomic).
func writePodName(dir, name string) error {
	tmp := filepath.Join(dir, podNameNewPin)
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("record pod name: %w", err)
	}
	if err := os.Symlink(name, tmp); err != nil {
		return fmt.Errorf("record pod name: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, PodNamePin)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("record pod name: %w", err)
	}
	return nil
}

// readPodName is the pod name recorded in pin directory dir, or "" if none was.
func readPodName(dir string) string {
	name, err := os.Readlink(filepath.Join(dir, PodNamePin))
	if err != nil {
		return ""
	}
	return name
}
