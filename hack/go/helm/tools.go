//go:build tools

// Package tools pins the command this module builds (helm.sh/helm/v3 v3.22.0).
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
