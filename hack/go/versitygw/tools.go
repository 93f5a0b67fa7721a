//go:build tools

// Package tools pins the command this module builds (github.com/versity/versitygw v1.8.0).
package tools

import (
	_ "github.com/versity/versitygw/cmd/versitygw"
)
