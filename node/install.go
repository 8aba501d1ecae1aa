package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// PluginType is the CNI type name of divert's plugin (its binary's name).
const PluginType = "divert-cni"

// InstallPlugin copies the plugin binary into the CNI bin dir (atomically: a runtime may
// exec it at any moment).
func InstallPlugin(src, binDir string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("open plugin binary: %w", err)
	}
	defer in.Close()
	tmp, err := os.CreateTemp(binDir, "."+PluginType+"-")
	if err != nil {
		return fmt.Errorf("install plugin into %s: %w", binDir, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), filepath.Join(binDir, PluginType))
}

// ActiveConflist is the conflist the runtime uses: the first *.conflist (or *.conf) in
// lexical order, as libcni picks it.
func ActiveConflist(confDir string) (string, error) {
	entries, err := os.ReadDir(confDir)
	if err != nil {
		return "", err
	}
	var names []string
	for _, e := range entries {
		if n := e.Name(); !e.IsDir() && (strings.HasSuffix(n, ".conflist") || strings.HasSuffix(n, ".conf")) {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "", fmt.Errorf("no CNI config in %s: the node's network plugin is not installed yet", confDir)
	}
	if !strings.HasSuffix(names[0], ".conflist") {
		return "", fmt.Errorf("%s is a single-plugin .conf; divert-cni needs a .conflist to chain into", names[0])
	}
	return filepath.Join(confDir, names[0]), nil
}

// Chain adds divert-cni at the end of the conflist's plugins (or updates its settings);
// it changes nothing when the entry is already as wanted.
func Chain(conflist string, entry map[string]any) (changed bool, err error) {
	return editConflist(conflist, func(plugins []any) []any {
		entry["type"] = PluginType
		for i, p := range plugins {
			if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
				plugins[i] = entry
				return plugins
			}
		}
		return append(plugins, entry)
	})
}

// Unchain removes divert-cni from the conflist.
func Unchain(conflist string) (changed bool, err error) {
	return editConflist(conflist, func(plugins []any) []any {
		out := plugins[:0]
		for _, p := range plugins {
			if m, ok := p.(map[string]any); !ok || m["type"] != PluginType {
				out = append(out, p)
			}
		}
		return out
	})
}

func editConflist(path string, edit func([]any) []any) (bool, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return false, fmt.Errorf("parse %s: %w", path, err)
	}
	plugins, ok := conf["plugins"].([]any)
	if !ok {
		return false, errors.New(path + ": no plugins list")
	}
	before, _ := json.Marshal(plugins)
	conf["plugins"] = edit(plugins)
	after, _ := json.Marshal(conf["plugins"])
	if string(before) == string(after) {
		return false, nil
	}
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return false, err
	}
	tmp := path + ".divert-tmp"
	if err := os.WriteFile(tmp, append(out, '\n'), 0o644); err != nil {
		return false, err
	}
	return true, os.Rename(tmp, path)
}
