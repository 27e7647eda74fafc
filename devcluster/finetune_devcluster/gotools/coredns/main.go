// Cluster DNS for a real node (realnode.py): CoreDNS with only the plugins its Corefile uses, so the
// build pulls the kubernetes plugin's client-go and nothing of the cloud DNS backends.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

func main() {
	// upstream's order (core/dnsserver/zdirectives.go) restricted to the plugins linked in
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "loadbalance", "cache", "template", "kubernetes"}
	coremain.Run()
}
