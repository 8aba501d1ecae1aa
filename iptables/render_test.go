package iptables

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRenderGolden pins the rendering of every case; UPDATE_GOLDEN=1 rewrites the files.
func TestRenderGolden(t *testing.T) {
	update := os.Getenv("UPDATE_GOLDEN") != ""
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Render(caseConfig(t, tc.args))
			path := filepath.Join("testdata", tc.name+".golden")
			if update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run UPDATE_GOLDEN=1 go test ./iptables/ to create it)", err)
			}
			if got != string(want) {
				t.Errorf("Render differs from %s (UPDATE_GOLDEN=1 rewrites it):\n%s", path, lineDiff(string(want), got))
			}
		})
	}
}

// TestRenderReference: the default case is byte for byte what istio-iptables hands to
// iptables-restore (shared/reference, copied into testdata).
func TestRenderReference(t *testing.T) {
	want, err := os.ReadFile(filepath.Join("testdata", "reference-default.rules"))
	if err != nil {
		t.Fatal(err)
	}
	if got := Render(caseConfig(t, nil)); got != string(want) {
		t.Errorf("Render(default) differs from istio's output:\n%s", lineDiff(string(want), got))
	}
}

// TestGoldenFilesHaveCases catches a golden file left behind by a renamed case.
func TestGoldenFilesHaveCases(t *testing.T) {
	names := map[string]bool{}
	for _, tc := range cases {
		if names[tc.name] {
			t.Errorf("case %q twice", tc.name)
		}
		names[tc.name] = true
	}
	files, _ := filepath.Glob(filepath.Join("testdata", "*.golden"))
	for _, f := range files {
		if name := strings.TrimSuffix(filepath.Base(f), ".golden"); !names[name] {
			t.Errorf("%s has no case in the table", f)
		}
	}
}

// lineDiff is a minimal line-by-line diff, enough to read a golden mismatch.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for i := 0; i < len(w) || i < len(g); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			b.WriteString("line " + itoa(i+1) + ":\n  want: " + wl + "\n  got:  " + gl + "\n")
		}
	}
	return b.String()
}

func itoa(i int) string { return u32(uint32(i)) }
