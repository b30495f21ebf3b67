//go:build tools

// Package tools names the commands scripts/cluster builds, so `go mod tidy` keeps their dependencies.
package tools

import (
	_ "github.com/google/go-containerregistry/cmd/crane"
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
