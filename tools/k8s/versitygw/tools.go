//go:build tools

// Package tools pins the S3-compatible server the tests read models and datasets from and export
// to (Versity's S3 gateway, posix backend: objects are files under a directory). ../build.sh builds
// it with `go build github.com/versity/versitygw/cmd/versitygw`. It has its own module so its
// dependencies never move the control plane's.
package tools

import _ "github.com/versity/versitygw/cmd/versitygw"
