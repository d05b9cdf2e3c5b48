// The test cluster's DNS server (../build.sh builds this package): CoreDNS with only the plugins
// the real node's Corefile uses (tests/cluster/node.py: bind, ready, errors and kubernetes, so
// headless Services resolve to pod IPs), built the way CoreDNS documents for a custom set of
// plugins, a main package of our own that imports them. The stock binary
// (github.com/coredns/coredns, every plugin: the AWS, Azure and Google DNS SDKs among them) took
// 122 s of a cold build. CoreDNS has its own module: its k8s.io/* versions differ from the control
// plane's and must not move them. A plugin the Corefile gains must be added here and to Directives.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// In CoreDNS's own order (core/dnsserver/zdirectives.go): each plugin sees the ones after it.
	dnsserver.Directives = []string{"bind", "ready", "errors", "kubernetes"}
}

func main() {
	coremain.Run()
}
