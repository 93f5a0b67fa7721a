// Command etcd is etcd's own server entry point, built from the released
// go.etcd.io/etcd/server/v3 module. etcd's main module uses replace
// directives, so `go install go.etcd.io/etcd/v3@vX` cannot work; this wrapper
// is a module of its own so its dependency versions stay apart from
// Kubernetes'.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
