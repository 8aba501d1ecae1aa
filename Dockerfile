# divert's image: a drop-in for Istio's istio-init container (docs/istio.md).
#
# No Docker engine is needed to test what this builds: test/initmode runs the very
# `go build` command of the build stage below (read from this file) and tests that binary,
# and deploy/ checks the final stage. Keep the build in one RUN line of this shape.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (no cgo): the final stage has no Go toolchain or C library it could depend on.
RUN CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags="-s -w" -o /out/divert ./cmd/divert

FROM debian:12-slim
# iptables (iptables-nft and iptables-legacy) for the fallback backend, on kernels where
# eBPF capture is not possible; nothing else is needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/divert /usr/local/bin/divert
# Istio's injector runs the image's entrypoint with "istio-iptables" as first argument; the
# link serves callers that exec istio-iptables by name.
RUN ln -s divert /usr/local/bin/istio-iptables
ENTRYPOINT ["/usr/local/bin/divert"]
