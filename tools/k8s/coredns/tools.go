//go:build tools

// Package tools pins the cluster DNS server the test cluster's real node uses (CoreDNS, with
// its kubernetes plugin, so headless Services resolve to pod IPs); ../build.sh builds it with
// `go build github.com/coredns/coredns`. CoreDNS has its own module: its k8s.io/* versions
// differ from the control plane's and must not move them.
package tools

import _ "github.com/coredns/coredns"
