package image

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// The Dockerfile's final stage, as make image (tools/image) rebuilds it without Docker.
func TestFinalStage(t *testing.T) {
	instrs, err := Parse(filepath.Join(RepoRoot(), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	bc, err := FindBuild(instrs)
	if err != nil {
		t.Fatal(err)
	}
	f, err := FinalStage(instrs, bc)
	if err != nil {
		t.Fatal(err)
	}
	want := Final{
		Base:       "debian:12-slim",
		Packages:   []string{"iptables"},
		Copies:     []Copy{{From: "build", Binaries: []string{"divert", "divert-cni", "divert-node"}, Dest: "/usr/local/bin/"}},
		Links:      []Link{{Target: "divert", Path: "/usr/local/bin/istio-iptables"}},
		Entrypoint: []string{"/usr/local/bin/divert"},
	}
	if !reflect.DeepEqual(f, want) {
		t.Errorf("final stage:\n got %+v\nwant %+v", f, want)
	}
	files := f.Files()
	if files["/usr/local/bin/divert"] != "divert" || files["/usr/local/bin/istio-iptables"] != "-> divert" {
		t.Errorf("files: %v", files)
	}
}

// A step the Go builder cannot reproduce fails, naming it.
func TestFinalStageRefusesUnknownSteps(t *testing.T) {
	base := "FROM golang AS build\nRUN CGO_ENABLED=0 go build -o /out/ ./cmd/divert\nFROM debian:12-slim\n"
	for _, tc := range []struct{ stage, want string }{
		{"RUN apt-get update && apt-get install -y --no-install-recommends curl && useradd x\nENTRYPOINT [\"/x\"]\n", "unknown command \"useradd x\""},
		{"RUN apt-get install -y iptables\nENTRYPOINT [\"/x\"]\n", "--no-install-recommends"},
		{"COPY --from=build /out/other /usr/local/bin/\nENTRYPOINT [\"/x\"]\n", "/out/other"},
		{"COPY --from=nowhere /out/divert /usr/local/bin/\nENTRYPOINT [\"/x\"]\n", "no earlier stage"},
		{"USER 1000\nENTRYPOINT [\"/x\"]\n", "unknown instruction"},
		{"ENTRYPOINT /x\n", "exec form"},
	} {
		p := filepath.Join(t.TempDir(), "Dockerfile")
		if err := os.WriteFile(p, []byte(base+tc.stage), 0o644); err != nil {
			t.Fatal(err)
		}
		instrs, err := Parse(p)
		if err != nil {
			t.Fatal(err)
		}
		bc, err := FindBuild(instrs)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := FinalStage(instrs, bc); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: want an error naming %q, got %v", tc.stage, tc.want, err)
		}
	}
}
