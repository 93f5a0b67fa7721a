//go:build tools

// Package tools pins the command this module builds (sigs.k8s.io/kwok v0.8.0).
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
