package bpf

import (
	"crypto/sha256"
	"encoding/hex"
)

// ObjectID names this build's programs: the first 12 hex digits of the SHA-256 of the
// embedded object, so `divert --version` says which programs a binary attaches.
func ObjectID() string {
	sum := sha256.Sum256(_DivertBytes)
	return hex.EncodeToString(sum[:6])
}
