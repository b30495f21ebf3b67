// The pod sandbox ("pause") program of the local cluster's pause image.
module isplit.local/cluster/pause

go 1.26.0
