// Package clierr phrases errors for divert's command lines: the loader's InputError, which
// names the setting at fault, as the flag of the same name, on one line. Both the CLI and
// the istio-iptables orchestration (istioinit) print through it, so a setting reads the
// same wherever it is refused.
package clierr

import (
	"errors"
	"fmt"
	"strings"

	"github.com/meshdivert/divert/loader"
)

// FlagNamed phrases the loader's InputError as the flag of the same name: "invalid cgroup
// ..." reads "invalid --cgroup ...". Other errors are returned as they are.
func FlagNamed(err error) error {
	var ie *loader.InputError
	if !errors.As(err, &ie) {
		return err
	}
	return &flaggedError{err, ie}
}

type flaggedError struct {
	err error
	ie  *loader.InputError
}

func (f *flaggedError) Error() string {
	return strings.Replace(f.err.Error(), f.ie.Error(), fmt.Sprintf("invalid --%s %q: %s", f.ie.Field, f.ie.Value, f.ie.Msg), 1)
}

func (f *flaggedError) Unwrap() error { return f.err }

// OneLine is err, flag-named, on one line.
func OneLine(err error) string { return strings.ReplaceAll(FlagNamed(err).Error(), "\n", " ") }

// IncompatibleHint adds the way out of pins this build cannot update (loader.ErrIncompatible).
func IncompatibleHint(err error, podID string) error {
	if errors.Is(err, loader.ErrIncompatible) {
		return fmt.Errorf("%w; run divert detach --pod-id %s first", err, podID)
	}
	return err
}
