// Cluster DNS for scripts/cluster: CoreDNS built with only the plugins the Corefile uses
// (main.go), which keeps the cloud providers' SDKs out of the build.
module isplit.local/cluster/coredns

go 1.26.0

require github.com/coredns/coredns v1.14.7
