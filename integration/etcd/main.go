// Command etcd is the etcd server of go.etcd.io/etcd/server/v3, built through this wrapper
// module because server/v3's own replace directives make `go install ...@version` refuse it
// (and server/v3 ships the etcdmain package, not a main package).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
