// Prometheus for the local cluster, built with Kubernetes service discovery (Debian's
// prometheus 2.42 package is built without it): scripts/cluster builds cmd/prometheus with the
// tags remove_all_sd,enable_kubernetes_sd (file and http SD stay).
module isplit.local/cluster/prometheus

go 1.26.7

require github.com/prometheus/prometheus v0.316.0
