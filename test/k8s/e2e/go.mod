// Module e2e is the single-node Kubernetes end-to-end suite (see ../README.md). It is a
// module of its own so that `go test ./...` at the repository root (make test) does not
// bring up a cluster, and so that its image-building dependency stays out of divert's
// go.mod. It builds divert and test/k8s/testapp from the repository by running the go
// command there, not by importing them.
module github.com/meshdivert/divert/test/k8s/e2e

go 1.26.8

require (
	github.com/google/go-containerregistry v0.20.7
	golang.org/x/sys v0.49.0
)

require (
	github.com/containerd/stargz-snapshotter/estargz v0.18.1 // indirect
	github.com/klauspost/compress v1.18.1 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
	github.com/vbatts/tar-split v0.12.2 // indirect
	golang.org/x/sync v0.18.0 // indirect
)
