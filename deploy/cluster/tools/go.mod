// Pins the small cluster tools scripts/cluster builds: crane (local OCI registry) and kwok (simulated GPU node).
module isplit.local/cluster/tools

go 1.26.0

require (
	github.com/google/go-containerregistry v0.22.1
	sigs.k8s.io/kwok v0.8.0
)
