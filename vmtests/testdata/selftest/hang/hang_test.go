// Package hang is a vmtests self-test that never finishes: the runner must report TIMEOUT.
package hang

import (
	"testing"
	"time"
)

func TestHangs(t *testing.T) {
	time.Sleep(24 * time.Hour)
}
