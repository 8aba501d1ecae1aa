# divert's image: a drop-in for Istio's istio-init container (docs/istio.md).
#
# No Docker engine is needed to build or test this image: `make image` (tools/image)
# rebuilds the final stage below for linux/amd64 and linux/arm64 from this file, and
# test/initmode runs the very `go build` command of the build stage (read from this file)
# and tests those binaries. Keep the build in one RUN line of this shape:
# [VAR=value ...] go build [flags] -o /out/ ./cmd/... (internal/image parses it), and the
# final stage to steps internal/image.FinalStage knows (apt-get install, COPY --from=build,
# ln -s, ENTRYPOINT): make test fails on any other. `make docker-image` runs docker build.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (no cgo): the final stage has no Go toolchain or C library it could depend on.
# One build for the three binaries: divert (init container, CLI), divert-node (the node
# agent: apart, so divert links no Kubernetes library and starts in a third of the time)
# and divert-cni, the chained CNI plugin the node agent installs on the host (it must run
# without the image).
RUN CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags="-s -w" -o /out/ ./cmd/divert ./cmd/divert-cni ./cmd/divert-node

FROM debian:12-slim
# iptables (iptables-nft and iptables-legacy) for the fallback backend, on kernels where
# eBPF capture is not possible; nothing else is needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/divert /out/divert-cni /out/divert-node /usr/local/bin/
# Istio's injector runs the image's entrypoint with "istio-iptables" as first argument; the
# link serves callers that exec istio-iptables by name.
RUN ln -s divert /usr/local/bin/istio-iptables
ENTRYPOINT ["/usr/local/bin/divert"]
