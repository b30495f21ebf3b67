"""Kafka authentication (SASL/SCRAM) against a real broker of this module's own, configured
for it by ``scripts/kafka`` (free ports, its own data dir; the shared broker is not touched)."""

from __future__ import annotations

import uuid

import pytest
from kafka.errors import KafkaError
from pydantic import ValidationError

from isplit.bus import (
    KafkaSecurity,
    PublishError,
    ensure_topics,
    kafka_reachable,
    make_consumer,
    make_producer,
    publish,
)
from isplit.messages import DatasetSpec, ModelSpec, SplitCandidate, decode
from tests.fixtures.kafka import private_kafka

pytestmark = pytest.mark.kafka

SCRAM = {
    "ISPLIT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "ISPLIT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "ISPLIT_KAFKA_SASL_USERNAME": "isplit",
    "ISPLIT_KAFKA_SASL_PASSWORD": "s3cret-pw",
}


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory: pytest.TempPathFactory):
    with private_kafka(tmp_path_factory.mktemp("kafka-scram") / "data", **SCRAM) as broker:
        yield broker


def as_client(monkeypatch: pytest.MonkeyPatch, **changes: str | None) -> None:
    """The isplit clients of this process authenticate with SCRAM, with ``changes``."""
    for name, value in {**SCRAM, **changes}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def candidate() -> SplitCandidate:
    return SplitCandidate(
        analysis_id="a-sasl",
        candidate_id="a-sasl-layer1",
        model=ModelSpec(arch="resnet18", num_classes=10, in_channels=1, input_size=32, weights_uri="models/m.pt"),
        dataset=DatasetSpec(name="digits"),
        cut="layer1",
        predicted_rank=1,
        cui=0.5,
        log10_cui=-0.3,
        size_rank=1,
        output_shape=[8, 4, 4],
        output_bytes=512,
        target="label",
    )


def test_the_right_scram_credentials_create_topics_produce_and_consume(scram_broker, monkeypatch):
    as_client(monkeypatch)
    topic = f"sasl.{uuid.uuid4().hex[:8]}"
    assert kafka_reachable(scram_broker.bootstrap, timeout_s=10)
    assert ensure_topics(scram_broker.bootstrap, {topic: 2}) == {topic: 2}
    producer = make_producer(scram_broker.bootstrap, "test-sasl")
    try:
        publish(producer, topic, "a-sasl", candidate())
    finally:
        producer.close()
    consumer = make_consumer(scram_broker.bootstrap, f"test-{uuid.uuid4().hex[:6]}", [topic])
    try:
        records = []
        for _ in range(40):
            records += [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
            if records:
                break
    finally:
        consumer.close()
    assert [decode(SplitCandidate, r.value).candidate_id for r in records] == ["a-sasl-layer1"]


@pytest.mark.parametrize(
    "changes",
    [
        {"ISPLIT_KAFKA_SASL_PASSWORD": "wrong-pw"},
        {"ISPLIT_KAFKA_SASL_USERNAME": "mallory"},
        {"ISPLIT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"},  # no credential of that mechanism
        {"ISPLIT_KAFKA_SECURITY_PROTOCOL": None},  # plaintext client on the SASL listener
    ],
    ids=["wrong-password", "unknown-user", "other-mechanism", "no-sasl"],
)
def test_wrong_credentials_are_refused(scram_broker, monkeypatch, changes):
    as_client(monkeypatch, **changes)
    assert not kafka_reachable(scram_broker.bootstrap, timeout_s=5)
    with pytest.raises((KafkaError, PublishError)):
        # kafka-python 3 gives up bootstrapping after bootstrap_timeout_ms (30 s by default).
        bounded = {"max_block_ms": 5000, "bootstrap_timeout_ms": 5000}
        producer = make_producer(scram_broker.bootstrap, "test-sasl-bad", **bounded)
        try:
            publish(producer, "anything", "k", candidate(), timeout_s=10)
        finally:
            producer.close(timeout=2)


def test_sasl_without_credentials_is_a_settings_error_naming_the_variables(monkeypatch):
    as_client(monkeypatch, ISPLIT_KAFKA_SASL_PASSWORD=None)
    with pytest.raises(ValidationError, match="ISPLIT_KAFKA_SASL_USERNAME and ISPLIT_KAFKA_SASL_PASSWORD"):
        KafkaSecurity()
