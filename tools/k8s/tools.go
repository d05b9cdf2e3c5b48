//go:build tools

// Package tools pins the control-plane and node binaries that tests/cluster runs; build.sh builds
// them with `go build <package>`. The build tag keeps this file out of every build: it
// exists so that `go mod tidy` records their dependencies in go.mod and go.sum.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
