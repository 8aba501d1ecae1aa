package bpf

import (
	"crypto/sha256"
	"encoding/hex"
)

// ObjectID names this build's programs: the first 12 hex digits of the SHA-256 of the
// embedded objects (divert.c's, then sk_lookup.c's), so `divert --version` says which
// programs a binary attaches, and a change to either is a new build (loader/node.go pins
// each build's programs apart, and a pod's sk_lookup comes from the small one).
func ObjectID() string {
	h := sha256.New()
	h.Write(_DivertBytes)
	h.Write(_SkLookupBytes)
	sum := h.Sum(nil)
	return hex.EncodeToString(sum[:6])
}
