package bpf

import "testing"

// A build is named by both of its objects: the loader pins each build's programs apart by
// this name, and a pod's sk_lookup comes from the small object, so a change to either one
// alone must be a new build.
func TestObjectIDCoversBothObjects(t *testing.T) {
	id := ObjectID()
	for _, obj := range []*[]byte{&_DivertBytes, &_SkLookupBytes} {
		orig := *obj
		changed := append([]byte(nil), orig...)
		changed[len(changed)-1] ^= 1
		*obj = changed
		got := ObjectID()
		*obj = orig
		if got == id {
			t.Errorf("ObjectID stayed %s when one object changed", id)
		}
	}
	if ObjectID() != id {
		t.Fatal("ObjectID is not a function of the objects")
	}
}
