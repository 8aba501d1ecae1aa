package loader

// SetTestHookBeforeCommit lets tests fail an attach at its last step.
func SetTestHookBeforeCommit(fn func() error) { testHookBeforeCommit = fn }

// SetLoadedTag makes the process believe this build's program name has tag, as if a newer
// divert were re-attaching; with tag "" it forgets every tag, as a fresh process would.
func SetLoadedTag(name, tag string) {
	loadedTags.Lock()
	defer loadedTags.Unlock()
	if tag == "" {
		loadedTags.byName = nil
		return
	}
	tags := map[string]string{}
	for k, v := range loadedTags.byName {
		tags[k] = v
	}
	tags[name] = tag
	loadedTags.byName = tags
}
