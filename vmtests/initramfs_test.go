package vmtests

import (
	"bytes"
	"strconv"
	"testing"
)

// readNewc is a minimal reader of what Initramfs writes, checking the framing rules the
// kernel's unpacker enforces: "070701" headers, 4-byte alignment, a final TRAILER!!!.
func readNewc(t *testing.T, b []byte) map[string]string {
	t.Helper()
	got := map[string]string{} // name -> mode in octal, ":" contents
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("no newc header at offset %d", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("header field %d at %d: %v", i, off, err)
			}
			return int(v)
		}
		mode, size, nameSize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+nameSize-1])
		data := align(off + 110 + nameSize)
		if name == "TRAILER!!!" {
			if end := align(data + size); end != len(b) {
				t.Errorf("archive ends at %d, %d bytes after the trailer", len(b), len(b)-end)
			}
			return got
		}
		got[name] = strconv.FormatInt(int64(mode), 8) + ":" + string(b[data:data+size])
		off = align(data + size)
	}
}

func TestInitramfs(t *testing.T) {
	r := NewInitramfs()
	r.Bytes("/a/b/file", []byte("hello"), 0o644)
	r.Symlink("/a/link", "b/file")
	r.CharDev("/dev/console", 5, 1, 0o600)
	var buf bytes.Buffer
	if _, err := r.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	got := readNewc(t, buf.Bytes())
	want := map[string]string{
		"a":           "40755:",
		"a/b":         "40755:",
		"a/b/file":    "100644:hello",
		"a/link":      "120777:b/file",
		"dev":         "40755:",
		"dev/console": "20600:",
	}
	if len(got) != len(want) {
		t.Errorf("got %d entries %q, want %d", len(got), got, len(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: got %q, want %q", k, got[k], v)
		}
	}
}
