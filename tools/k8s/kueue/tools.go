//go:build tools

// Package tools pins Kueue, the quota and admission controller the test cluster runs
// (../build.sh builds cmd/kueue; its CRDs and webhook manifests are read from the same module's
// files). Its own module: its k8s.io/* versions are not the control plane's.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
