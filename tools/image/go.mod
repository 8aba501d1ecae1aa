// Module image is make image's builder (see main.go). A module of its own so divert's
// go.mod never sees go-containerregistry; it reads the Dockerfile with the root module's
// internal/image, through the replace below.
module github.com/meshdivert/divert/tools/image

go 1.26.8

require (
	github.com/google/go-containerregistry v0.20.7
	github.com/meshdivert/divert v0.0.0
)

require (
	github.com/containerd/stargz-snapshotter/estargz v0.18.1 // indirect
	github.com/klauspost/compress v1.18.1 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
	github.com/vbatts/tar-split v0.12.2 // indirect
	golang.org/x/sync v0.18.0 // indirect
)

replace github.com/meshdivert/divert => ../..
