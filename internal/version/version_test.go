package version

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// The image tag (the Makefile's VERSION) and the binary's --version are one number.
func TestMakefileVersion(t *testing.T) {
	b, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^VERSION \?= (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("no VERSION ?= line in the Makefile")
	}
	if string(m[1]) != Version {
		t.Errorf("Makefile VERSION %s, version.Version %s: change both", m[1], Version)
	}
	if s := String(); !strings.HasPrefix(s, "divert "+Version+" (programs ") {
		t.Errorf("String() = %q", s)
	}
}
