//go:build tools

// Package tools names the command scripts/cluster builds, so `go mod tidy` keeps its dependencies.
package tools

import _ "github.com/prometheus/prometheus/cmd/prometheus"
