package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Fallback markers record that a pod is captured by the iptables backend because eBPF was
// not possible, and why, where the node can see it without the init container's logs:
// <bpffs>/divert_fallback/<pod id>, a symlink whose target is the reason (bpffs holds
// directories, pins and symlinks, no regular files). They live beside the pods' pin
// directories, not in them, so nothing takes a marker for an attachment.

func fallbackDir(opts Options) string { return filepath.Join(opts.root(), "divert_fallback") }

// FallbackPath is where pod id's fallback marker lives.
func FallbackPath(opts Options, id string) string { return filepath.Join(fallbackDir(opts), id) }

// maxReason keeps a marker's target well below PATH_MAX.
const maxReason = 1024

// RecordFallback records that pod id is captured by iptables instead of eBPF, for reason.
// A marker already there is replaced.
func RecordFallback(id, reason string, opts Options) error {
	if !validID(id) {
		return &InputError{Field: "pod-id", Value: id, Msg: badID}
	}
	unlock, err := lockState(opts)
	if err != nil {
		return err
	}
	defer unlock()
	if err := mkdirPrivate(fallbackDir(opts)); err != nil {
		return err
	}
	reason = strings.ReplaceAll(reason, "\n", " ")
	if len(reason) > maxReason {
		reason = reason[:maxReason]
	}
	path := filepath.Join(fallbackDir(opts), id)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("replace fallback marker: %w", err)
	}
	if err := os.Symlink(reason, path); err != nil {
		return fmt.Errorf("record fallback marker: %w", err)
	}
	return nil
}

// ClearFallback removes pod id's fallback marker, if any; it mounts nothing to find none.
func ClearFallback(id string, opts Options) error {
	if !validID(id) {
		return &InputError{Field: "pod-id", Value: id, Msg: badID}
	}
	err := os.Remove(filepath.Join(fallbackDir(opts), id))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove fallback marker of pod %s: %w", id, err)
	}
	return nil
}

// Fallbacks returns the recorded fallbacks: the reason by pod id.
func Fallbacks(opts Options) (map[string]string, error) {
	entries, err := os.ReadDir(fallbackDir(opts))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, e := range entries {
		if !validID(e.Name()) {
			continue
		}
		if reason, err := os.Readlink(filepath.Join(fallbackDir(opts), e.Name())); err == nil {
			out[e.Name()] = reason
		}
	}
	return out, nil
}
