package image

import (
	"encoding/json"
	"fmt"
	"path"
	"strings"
)

// Final is what the Dockerfile's final stage puts in the image, read instruction by
// instruction: the Go image builder (tools/image, make image) builds from it, so the two
// cannot drift. An instruction or shell command it does not know is an error, not skipped:
// whoever changes the final stage teaches FinalStage (and the builder) the new step.
type Final struct {
	Base       string   // the FROM image, e.g. debian:12-slim
	Packages   []string // apt-get install's packages, without recommends
	Copies     []Copy   // COPY --from=<build stage>
	Links      []Link   // RUN ln -s
	Entrypoint []string // ENTRYPOINT, exec form
}

// Copy is one COPY --from=<stage> of build outputs: each source is a binary the build line
// writes (a name of BuildCommand.Binaries), copied into the directory Dest.
type Copy struct {
	From     string
	Binaries []string
	Dest     string // a directory, ending in "/"
}

// Link is a symbolic link Path -> Target (ln -s Target Path).
type Link struct {
	Target, Path string
}

// Files maps each path the final stage adds (besides the packages) to what it is: the
// binary name for a copy, "-> target" for a link.
func (f Final) Files() map[string]string {
	out := map[string]string{}
	for _, c := range f.Copies {
		for _, b := range c.Binaries {
			out[path.Join(c.Dest, b)] = b
		}
	}
	for _, l := range f.Links {
		out[l.Path] = "-> " + l.Target
	}
	return out
}

// FinalStage reads the last stage of instrs. bc is the build line, whose output directory
// the COPY sources must come from.
func FinalStage(instrs []Instruction, bc BuildCommand) (Final, error) {
	var f Final
	if len(instrs) == 0 {
		return f, fmt.Errorf("no instructions")
	}
	last := instrs[len(instrs)-1].Stage
	stages := map[string]int{}
	for _, in := range instrs {
		if in.Cmd == "FROM" {
			if w := strings.Fields(in.Args); len(w) == 3 && strings.EqualFold(w[1], "AS") {
				stages[w[2]] = in.Stage
			}
		}
	}
	for _, in := range instrs {
		if in.Stage != last {
			continue
		}
		bad := func(why string) error {
			return fmt.Errorf("final stage: %s %s: %s (make image builds the image from this stage without Docker: teach internal/image and tools/image the step)", in.Cmd, in.Args, why)
		}
		switch in.Cmd {
		case "FROM":
			w := strings.Fields(in.Args)
			if len(w) != 1 {
				return f, bad("want FROM <image>")
			}
			f.Base = w[0]
		case "RUN":
			for _, sub := range strings.Split(in.Args, "&&") {
				words, err := Words(sub)
				if err != nil {
					return f, bad(err.Error())
				}
				if err := f.run(words); err != nil {
					return f, bad(err.Error())
				}
			}
		case "COPY":
			w := strings.Fields(in.Args)
			if len(w) < 3 || !strings.HasPrefix(w[0], "--from=") {
				return f, bad("want COPY --from=<stage> <src>... <dir>/")
			}
			c := Copy{From: strings.TrimPrefix(w[0], "--from="), Dest: w[len(w)-1]}
			if st, ok := stages[c.From]; !ok || st == last {
				return f, bad("copies from no earlier stage")
			}
			if !strings.HasSuffix(c.Dest, "/") {
				return f, bad("the destination must be a directory (end in /)")
			}
			for _, src := range w[1 : len(w)-1] {
				name, ok := strings.CutPrefix(src, bc.OutDir)
				if !ok || strings.Contains(name, "/") || !contains(bc.Binaries(), name) {
					return f, bad(fmt.Sprintf("%s is not a binary the build line writes into %s", src, bc.OutDir))
				}
				c.Binaries = append(c.Binaries, name)
			}
			f.Copies = append(f.Copies, c)
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(in.Args), &f.Entrypoint); err != nil || len(f.Entrypoint) == 0 {
				return f, bad("want the exec form, ENTRYPOINT [\"...\"]")
			}
		default:
			return f, bad("unknown instruction")
		}
	}
	if f.Base == "" || len(f.Entrypoint) == 0 {
		return f, fmt.Errorf("final stage: no FROM or no ENTRYPOINT")
	}
	return f, nil
}

// run reads one shell command of a RUN line.
func (f *Final) run(w []string) error {
	switch {
	case len(w) == 2 && w[0] == "apt-get" && w[1] == "update":
	case len(w) == 3 && w[0] == "rm" && w[1] == "-rf" && w[2] == "/var/lib/apt/lists/*":
	case len(w) > 2 && w[0] == "apt-get" && w[1] == "install":
		var opts []string
		for _, a := range w[2:] {
			if strings.HasPrefix(a, "-") {
				opts = append(opts, a)
			} else {
				f.Packages = append(f.Packages, a)
			}
		}
		if strings.Join(opts, " ") != "-y --no-install-recommends" {
			return fmt.Errorf("apt-get install: want -y --no-install-recommends, got %v", opts)
		}
	case len(w) == 4 && w[0] == "ln" && w[1] == "-s":
		dst := w[3]
		if !path.IsAbs(dst) {
			return fmt.Errorf("ln -s: the link path must be absolute")
		}
		f.Links = append(f.Links, Link{Target: w[2], Path: dst})
	default:
		return fmt.Errorf("unknown command %q", strings.Join(w, " "))
	}
	return nil
}

func contains(s []string, x string) bool {
	for _, y := range s {
		if y == x {
			return true
		}
	}
	return false
}
