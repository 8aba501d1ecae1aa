// Command coredns is CoreDNS v1.15.0 with the plugins the e2e cluster's Corefile uses and
// no others: CoreDNS's own main links all of them (core/plugin), cloud providers'
// SDKs included, which would triple the build for nothing the cluster runs. Each plugin
// registers itself when imported; coremain.Run is CoreDNS's own main.
package main

import (
	"github.com/coredns/coredns/coremain"

	// The Corefile's plugins (test/k8s/e2e's CoreDNS manifest).
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
