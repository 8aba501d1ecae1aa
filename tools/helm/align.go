//go:build align

// This module resolves its dependencies exactly as test/k8s/istio does (Istio's own
// requirements and the same Helm), so the Kubernetes and Helm packages make test compiles
// here are the ones make e2e-k8s's build of Istio's injector finds in the build cache.
// Never built: the align tag only keeps istio.io/istio in go.mod for go mod tidy.
package main

import _ "istio.io/istio/pkg/kube/inject"
