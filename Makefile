# divert: see README.md. `make demo` and `make test` are the two commands a new machine needs.
GO        ?= go
BIN       := bin
GOFLAGS   ?=
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: all deps generate build test unit fuzz demo check-generated parity-soak bench vmtest vmtest-ci vmtest-many-cpus vmtest-selftest e2e-k8s clean

all: build

deps:
	@scripts/deps.sh

# Rebuild the bpf2go outputs (committed, so plain `go build` needs no clang).
generate: deps
	cd bpf && $(GO) generate ./...

# divert-node is the node agent (`divert node` execs the one next to divert); divert-cni the
# plugin it installs.
build:
	CGO_ENABLED=0 $(GO) build $(GOFLAGS) -o $(BIN)/ ./cmd/divert ./cmd/divert-node ./cmd/divert-cni

# The image: istio-init's drop-in (docs/istio.md, docs/install.md). make image builds it
# without Docker (tools/image, its own module: go-containerregistry): the Dockerfile's final
# stage for linux/amd64 and linux/arm64, written to IMAGE_OUT as an OCI layout (oci/) and
# docker-archives (divert-<arch>.tar); it prints how to load or push them. It needs the Go
# module proxy and a Debian mirror (iptables' .debs, cached in ~/.cache/divert-image).
# make docker-image builds the same contents from the Dockerfile with a Docker engine.
# make image-check builds the amd64 image and runs divert and iptables from it (root).
# Every manifest under deploy/ names this very reference (deploy's test checks): bump
# VERSION, then make manifests.
VERSION ?= 0.1.0
IMAGE ?= ghcr.io/meshdivert/divert:$(VERSION)
IMAGE_OUT ?= $(BIN)/image
IMAGE_ARCHS ?= amd64,arm64
.PHONY: image image-check docker-image manifests
image:
	cd tools/image && $(GO) run . -o $(abspath $(IMAGE_OUT)) -ref $(IMAGE) -arch $(IMAGE_ARCHS)
image-check:
	cd tools/image && $(GO) test -count=1 -run '^TestBuiltImage$$' -v -image.real -image.arch $(IMAGE_ARCHS)
docker-image:
	docker build -t $(IMAGE) .

# deploy/'s manifests with divert's image set to IMAGE, deploy/istio/istio-operator.yaml
# made from the injection template (its one source), the Helm chart's default image, and
# deploy/node/divert-node.yaml rendered from the chart (tools/helm: Helm v4, its own module).
# In place by default; for your registry, a copy:
# make manifests IMAGE=registry.example.com/divert:0.1.0 OUT=my-deploy
MANIFESTS_OUT = $(abspath $(or $(OUT),deploy))
manifests:
	$(GO) run ./internal/manifests/gen -image $(IMAGE) -in deploy -out $(MANIFESTS_OUT)
	cd tools/helm && $(GO) run ./cmd/node-manifest -chart $(MANIFESTS_OUT)/helm/divert -out $(MANIFESTS_OUT)/node/divert-node.yaml

# Everything, privileged tests included: run as root. Packages run one at a time so the
# kernel-touching suites do not compete for the 2 cores and skew timeouts.
# CI set: a privileged test fails rather than skips without root (test/testutil).
test: deps
	$(GO) vet ./...
	CI=$${CI:-true} $(GO) test $(TESTFLAGS) -p 1 ./...
	cd tools/image && $(GO) vet ./... && $(GO) test $(TESTFLAGS) ./...
	cd test/bench && $(GO) vet ./... && CI=$${CI:-true} $(GO) test $(TESTFLAGS) -run 'Test' ./...
	cd tools/helm && $(GO) vet ./... && $(GO) test $(TESTFLAGS) ./...

# gofmt over every tracked Go file; staticcheck (pinned here, run from the module proxy, so
# go.mod lists no tool the product does not need) over every module but test/k8s/kube, one
# file around Kubernetes' own main whose check would type-check all of Kubernetes. The
# Helm and Istio modules' packages compiled here are the ones make test and make e2e-k8s
# build next, from the same cache (docs/ci.md).
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
LINT_MODULES := . test/bench tools/image tools/helm test/k8s/e2e test/k8s/coredns test/k8s/istio
.PHONY: lint
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:" $$out >&2; exit 1; fi
	@for m in $(LINT_MODULES); do echo "staticcheck $$m"; (cd $$m && GOFLAGS= $(GO) run $(STATICCHECK) ./...) || exit 1; done

# Only the tests that need no privilege: the privileged ones skip (test/testutil), as they
# do in a contributor's plain `go test ./...` without root.
unit:
	DIVERT_TEST_UNPRIVILEGED=1 CI= $(GO) test $(TESTFLAGS) ./...

# 1,000,000 connections through one pod at full rate, 1,000 long-lived ones held open
# throughout (make test runs 20,000 and 500): nothing lost, nothing left (docs/benchmarks.md).
.PHONY: soak
soak: deps
	$(GO) test -count=1 -timeout 2h ./test/e2e -run '^TestSoak$$' -v \
		-soak.short=$(or $(CONNS),1000000) -soak.long=$(or $(LONG),1000) -soak.workers=$(or $(WORKERS),8) \
		-soak.docs=$(abspath docs/soak.md)

# Go native fuzzing: every fuzz target of FUZZ_PKGS for FUZZ_EXECS executions each, one
# after the other (fuzzing runs one target at a time). A count, not a duration: Go 1.26's
# fuzz coordinator can fail a target with a bare "context deadline exceeded" when a
# -fuzztime duration runs out (golang/go#75804, fixed in 1.27); a count sets no deadline.
# The targets differ ~30x in speed (FuzzConfig a few hundred a second, FuzzPlugin ~10,000
# here). Each package is built once with the fuzzer's instrumentation (go test -c -fuzz),
# then each of its targets runs from that binary, with go test's corpus cache. The committed
# seed corpora (testdata/fuzz/, f.Add) already run in make test; an input that fails is
# written to testdata/fuzz/<target>/ for committing with the fix.
FUZZ_EXECS ?= 20000
FUZZ_PKGS := policy cmd/divert node cmd/divert-cni
fuzz:
	@if [ -n "$(FUZZTIME)" ]; then echo "make fuzz: FUZZTIME is gone, set FUZZ_EXECS=N (executions per target)" >&2; exit 2; fi
	@set -e; mkdir -p $(BIN)/fuzz; cache=$$($(GO) env GOCACHE)/fuzz; \
	for pkg in $(FUZZ_PKGS); do \
		s=$$(date +%s); bin=$(abspath $(BIN))/fuzz/$$(echo $$pkg | tr / _).test; ipath=$$($(GO) list ./$$pkg); \
		$(GO) test -c -fuzz . -o $$bin ./$$pkg; \
		echo "fuzz: $$pkg built with instrumentation in $$(( $$(date +%s) - s )) s"; \
		for fn in $$($$bin -test.list '^Fuzz'); do \
			s=$$(date +%s); \
			(cd $$pkg && $$bin -test.run '^$$' -test.fuzz "^$$fn$$" -test.fuzztime $(FUZZ_EXECS)x \
				-test.fuzzcachedir $$cache/$$ipath/$$fn); \
			echo "fuzz: $$fn ($$pkg) took $$(( $$(date +%s) - s )) s"; \
		done; \
	done

# Many more random configs than make test runs; SEED=n replays one run.
parity-soak: deps
	$(GO) test -count=1 -timeout 60m ./test/parity -run TestRandomParity -v \
		-parity.configs=$(or $(CONFIGS),300) -parity.conns=$(or $(CONNS),40) -parity.seed=$(or $(SEED),0)

# The CLI and the node agent killed many more times than make test does; SEED=n replays.
.PHONY: crash-soak
crash-soak: deps
	$(GO) test -count=1 -timeout 60m ./cmd/divert -run '^TestCLIKilled$$' -v \
		-crash.kills=$(or $(KILLS),2000) -crash.seed=$(or $(SEED),0)
	$(GO) test -count=1 -timeout 60m ./node -run '^(TestAgentKilled|TestCNIAddStorm)$$' -v \
		-crash.kills=$(or $(KILLS),2000) -crash.seed=$(or $(SEED),0) -storm.pods=$(or $(PODS),100)

# Fails if `make generate` changes committed files.
check-generated: generate
	@git diff --exit-code -- bpf/ || { echo "bpf2go outputs are stale: run make generate and commit" >&2; exit 1; }

demo: deps build
	$(GO) test -c -o $(BIN)/demo.test ./test/demo
	$(BIN)/demo.test -test.run '^TestDemo$$' -divert $(abspath $(BIN)/divert)

# Benchmarks: eBPF vs iptables (nft, legacy) vs the proxy alone vs no proxy, side by side
# (test/bench, see docs/benchmarks.md). As root; writes bench-out/ and, unless QUICK=1,
# rewrites docs/benchmarks.md and its plots. QUICK=1 (under 2 minutes) is CI's smoke run.
# ONLY=B7 (or B1,B4, ...) runs those alone and replaces only their sections of the docs.
bench: deps
	cd test/bench && $(GO) test -c -o $(abspath $(BIN))/bench.test .
	$(BIN)/bench.test -test.run '^$$' -test.bench '^BenchmarkDivert$$' -test.benchtime 1x -test.timeout 30m \
		-bench.out $(abspath bench-out) $(if $(QUICK),-bench.quick,-bench.docs $(abspath docs)) $(if $(ONLY),-bench.only $(ONLY))

# The kernel-touching suites inside qemu guests booting Debian's kernels (vmtests/README.md):
# every kernel in vmtests/kernels.txt, or KERNELS=6.1; RUNNER=vng uses virtme-ng. The whole
# of test/parity takes over 20 minutes in a TCG guest (5.10 at load ~8: timed out at 20 with
# TestOutboundParity and TestRandomParity still to run), hence its longer limit per binary.
vmtest: deps
	bash vmtests/deps.sh
	$(GO) run ./vmtests/cmd/vmtest -timeout 60m $(if $(KERNELS),-kernels $(KERNELS))
	$(MAKE) vmtest-many-cpus

# The burst on a node with many CPUs: an LRU map hands each CPU its own batch of free
# entries, so a per-CPU cache would starve there long before it is full. 32 guest CPUs on
# Debian's 6.1 and 6.12 (both predate the kernel's LRU fix); ~2.5 min each under TCG.
# (MANY_CPU_KERNELS, not a literal list inside $(or ...): make splits its arguments at
# commas, and "6.1,6.12" there ran 6.1 alone.)
MANY_CPU_KERNELS := 6.1,6.12
# One host thread runs all 32 vCPUs in turn: with a thread each, 6.12 guests died on an int3
# their own live patching had removed (an emulator race, docs/kernel-facts.md); single is
# as fast here (2 host cores) and uses half the CPU.
MANY_CPU_ACCEL := tcg,thread=single
vmtest-many-cpus: deps
	bash vmtests/deps.sh
	$(GO) run ./vmtests/cmd/vmtest -kernels $(or $(KERNELS),$(MANY_CPU_KERNELS)) -smp 32 -accel $(MANY_CPU_ACCEL) -packages ./test/e2e -run 'TestBurst|TestHAProxy'

# What CI can run: 6.1 and 6.12, the multi-minute stress tests skipped.
vmtest-ci: deps
	bash vmtests/deps.sh
	$(GO) run ./vmtests/cmd/vmtest -kernels 6.1,6.12 -quick

# Proves the runner: a failing, hanging or crashing guest test must fail the run.
vmtest-selftest: deps
	bash vmtests/deps.sh
	$(GO) run ./vmtests/cmd/vmtest -kernels 6.1 -selftest

# A real single-node Kubernetes here (test/k8s/README.md): divert as the pods' init container,
# real connections through sidecar-shaped pods; prints scenario -> result.
e2e-k8s: deps
	cd test/k8s/e2e && $(GO) test -count=1 -timeout 60m -v .

clean:
	rm -rf $(BIN)
