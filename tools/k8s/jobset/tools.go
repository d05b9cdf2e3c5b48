//go:build tools

// Package tools pins the JobSet controller the test cluster runs for multi-node stages
// (../build.sh builds it with `go build sigs.k8s.io/jobset`; its CRD and webhook manifests are
// read from the same module's files). JobSet has its own module: its k8s.io/* versions differ
// from the control plane's and must not move them.
package tools

import _ "sigs.k8s.io/jobset"
