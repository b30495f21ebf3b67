"""Shared fixtures: real Kafka, real TorchServe, real service processes, a small trained model."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.torchserve",
    "tests.fixtures.services",
    "tests.fixtures.stack",
]
