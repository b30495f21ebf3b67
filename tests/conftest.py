"""Shared fixtures: real Kafka, real PostgreSQL, real TorchServe, real service processes, a small trained model."""

import os

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.torchserve",
    "tests.fixtures.services",
    "tests.fixtures.stack",
    "tests.fixtures.postgres",
]

# tests/cluster needs root, a Docker engine and minutes of image builds: `make test-cluster`
# runs it (ISPLIT_CLUSTER_TESTS=1); `make test` leaves it out.
collect_ignore = [] if os.environ.get("ISPLIT_CLUSTER_TESTS") == "1" else ["cluster"]
