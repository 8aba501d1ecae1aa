package loader

// SetTestHookBeforeCommit lets tests fail an attach at its last step.
func SetTestHookBeforeCommit(fn func() error) { testHookBeforeCommit = fn }
