//go:build tools

// Package tools pins the Kubeflow training operator (PyTorchJob) the test cluster runs for
// multi-node stages (../build.sh builds cmd/training-operator.v1; the PyTorchJob CRD is read from
// the same module's manifests). Its own module: its k8s.io/* versions are not the control plane's.
package tools

import _ "github.com/kubeflow/training-operator/cmd/training-operator.v1"
