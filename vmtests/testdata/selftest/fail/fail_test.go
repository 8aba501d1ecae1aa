// Package fail is a vmtests self-test that always fails: a run including it must fail.
// VMTEST_SELFTEST_FAIL=1 adds it to a normal run.
package fail

import "testing"

func TestAlwaysFails(t *testing.T) {
	t.Fatal("deliberate failure: the vmtests runner must report this package as FAIL")
}
