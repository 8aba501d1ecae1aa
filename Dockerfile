# divert's image: a drop-in for Istio's istio-init container (docs/istio.md).
#
# No Docker engine is needed to test what this builds: test/initmode runs the very
# `go build` command of the build stage below (read from this file) and tests those binaries,
# and deploy/ checks the final stage. Keep the build in one RUN line of this shape:
# [VAR=value ...] go build [flags] -o /out/ ./cmd/... (internal/image parses it).

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (no cgo): the final stage has no Go toolchain or C library it could depend on.
# One build for both binaries: divert (init container, node agent, CLI) and divert-cni, the
# chained CNI plugin the node agent installs on the host (it must run without the image).
RUN CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags="-s -w" -o /out/ ./cmd/divert ./cmd/divert-cni

FROM debian:12-slim
# iptables (iptables-nft and iptables-legacy) for the fallback backend, on kernels where
# eBPF capture is not possible; nothing else is needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/divert /out/divert-cni /usr/local/bin/
# Istio's injector runs the image's entrypoint with "istio-iptables" as first argument; the
# link serves callers that exec istio-iptables by name.
RUN ln -s divert /usr/local/bin/istio-iptables
ENTRYPOINT ["/usr/local/bin/divert"]
