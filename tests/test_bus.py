"""Kafka helpers (isplit.bus) against the real broker started by the kafka_bootstrap fixture."""

from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer

from isplit.bus import (
    ConsumerProgress,
    PublishError,
    dead_letter,
    ensure_topics,
    kafka_reachable,
    make_consumer,
    make_producer,
    publish,
)
from isplit.messages import (
    TOPIC_DEAD_LETTER,
    TOPIC_PARTITIONS,
    DatasetSpec,
    DeadLetter,
    ModelSpec,
    SplitCandidate,
    candidate_id_for,
    decode,
)
from tests.fixtures.kafka import private_kafka

pytestmark = pytest.mark.kafka


def partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Partition count per topic, as the broker describes it."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-describe")
    try:
        described = admin.describe_topics(topics)
    finally:
        admin.close()
    return {(t.get("name") or t.get("topic")): len(t["partitions"]) for t in described}


def consume(consumer: KafkaConsumer, count: int, timeout_s: float = 20.0) -> list:
    """Poll until ``count`` records arrived or ``timeout_s`` passed."""
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def candidate(analysis_id: str, cut: str) -> SplitCandidate:
    return SplitCandidate(
        analysis_id=analysis_id,
        candidate_id=candidate_id_for(analysis_id, cut),
        model=ModelSpec(arch="simplecnn", num_classes=10, in_channels=1, input_size=28, weights_uri="m/w.pt"),
        dataset=DatasetSpec(name="digits", classes=None),
        cut=cut,
        predicted_rank=1,
        cui=0.5,
        log10_cui=-0.301,
        size_rank=2,
        output_shape=[32, 7, 7],
        output_bytes=6272,
        target="predicted",
    )


def test_contract_topics_exist_with_their_partition_counts(kafka_bootstrap):
    assert partition_counts(kafka_bootstrap, list(TOPIC_PARTITIONS)) == TOPIC_PARTITIONS


def test_ensure_topics_creates_each_topic_with_the_requested_partitions(kafka_bootstrap, unique_topic_prefix):
    wanted = {
        unique_topic_prefix + "six": 6,
        unique_topic_prefix + "three": 3,
        unique_topic_prefix + "one": 1,
    }
    assert ensure_topics(kafka_bootstrap, wanted) == wanted
    assert partition_counts(kafka_bootstrap, list(wanted)) == wanted


def test_ensure_topics_leaves_existing_topics_as_they_are(kafka_bootstrap, kafka_topics):
    topic = kafka_topics({"t": 2})["t"]
    assert ensure_topics(kafka_bootstrap, {topic: 5}) == {topic: 2}


def test_published_candidate_is_consumed_unchanged_keyed_by_analysis_id(
    kafka_bootstrap, kafka_topics, unique_topic_prefix
):
    topic = kafka_topics({"candidates": 6})["candidates"]
    sent = candidate("an-42", "layer2.0")
    producer = make_producer(kafka_bootstrap, "test-producer")
    try:
        metadata = publish(producer, topic, sent.analysis_id, sent)
    finally:
        producer.close()
    consumer = make_consumer(kafka_bootstrap, unique_topic_prefix + "group", [topic])
    try:
        [record] = consume(consumer, 1)
    finally:
        consumer.close()
    assert (record.partition, record.offset) == (metadata.partition, metadata.offset)
    assert record.key == "an-42"
    assert decode(SplitCandidate, record.value) == sent


def test_dead_letter_carries_the_original_bytes_and_the_reason(kafka_bootstrap, kafka_topics, unique_topic_prefix):
    source = kafka_topics({"candidates": 1})["candidates"]
    garbage = b'{"schema_version": 7, "\xff'
    producer = make_producer(kafka_bootstrap, "test-producer")
    consumer = make_consumer(kafka_bootstrap, unique_topic_prefix + "group", [source])
    try:
        producer.send(source, key=b"an-7", value=garbage).get(timeout=10)
        [bad] = consume(consumer, 1)
        acked = dead_letter(producer, source, bad, "unsupported schema_version 7", service="trainer")
    finally:
        consumer.close()
        producer.close()
    reader = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    try:
        reader.assign([acked.topic_partition])
        reader.seek(acked.topic_partition, acked.offset)
        [record] = consume(reader, 1)
    finally:
        reader.close()
    letter = decode(DeadLetter, record.value)
    assert acked.topic == TOPIC_DEAD_LETTER
    assert record.key == b"an-7"
    assert letter.original() == garbage
    assert (letter.reason, letter.service) == ("unsupported schema_version 7", "trainer")
    assert (letter.source_topic, letter.partition, letter.offset) == (source, bad.partition, bad.offset)


def test_uncommitted_records_are_read_again_by_the_next_consumer_of_the_group(
    kafka_bootstrap, kafka_topics, unique_topic_prefix
):
    topic = kafka_topics({"candidates": 1})["candidates"]
    sent = [candidate("an-1", cut) for cut in ("layer1", "layer2", "layer3")]
    producer = make_producer(kafka_bootstrap, "test-producer")
    try:
        for message in sent:
            publish(producer, topic, message.analysis_id, message)
    finally:
        producer.close()
    group = unique_topic_prefix + "trainers"

    first = make_consumer(kafka_bootstrap, group, [topic])
    try:
        [done] = consume(first, 1)
        first.commit()  # processed and committed
        [crashed_on] = consume(first, 1)  # fetched, never committed
    finally:
        first.close()
    second = make_consumer(kafka_bootstrap, group, [topic])
    try:
        again = consume(second, 2)
    finally:
        second.close()

    assert decode(SplitCandidate, done.value).cut == "layer1"
    assert decode(SplitCandidate, crashed_on.value).cut == "layer2"
    assert [decode(SplitCandidate, r.value).cut for r in again] == ["layer2", "layer3"]


def test_publish_to_a_missing_topic_raises_publish_error_naming_topic_and_key(kafka_bootstrap, unique_topic_prefix):
    producer = make_producer(kafka_bootstrap, "test-producer", max_block_ms=1000)
    try:
        with pytest.raises(PublishError, match=rf"to {unique_topic_prefix}missing \(key 'an-9'\)"):
            publish(producer, unique_topic_prefix + "missing", "an-9", candidate("an-9", "layer1"), timeout_s=2)
    finally:
        producer.close()


def test_kafka_reachable_tells_a_broker_from_a_closed_port(kafka_bootstrap):
    assert kafka_reachable(kafka_bootstrap, timeout_s=5)
    assert not kafka_reachable("127.0.0.1:1", timeout_s=1)


def test_a_publish_spanning_a_broker_outage_is_written_once_though_the_caller_retries(tmp_path):
    """The trainer retries a failed publish. A publish that gave up while its record was still
    queued (the broker down) let the record go out later beside its retry: two results."""
    with private_kafka(tmp_path / "kafka") as broker:
        ensure_topics(broker.bootstrap, {"outage": 1})
        producer = make_producer(broker.bootstrap, "test-outage")
        publish(producer, "outage", "warm-up", candidate("an-0", "layer0"))
        broker.stop()
        attempts: list[str] = []

        def publish_like_the_trainer() -> None:
            for _ in range(5):
                try:
                    publish(producer, "outage", "an-1", candidate("an-1", "layer1"))
                    attempts.append("acknowledged")
                    return
                except PublishError:
                    attempts.append("failed")
                    time.sleep(2)

        worker = threading.Thread(target=publish_like_the_trainer)
        worker.start()
        time.sleep(40)  # longer than the 30 s the publish used to wait before giving up
        broker.start()
        worker.join(timeout=240)
        producer.close()
        consumer = make_consumer(broker.bootstrap, "test-outage-reader", ["outage"], max_poll_records=100)
        try:
            keys = [r.key for r in consume(consumer, 3, timeout_s=20)]
        finally:
            consumer.close()
    assert attempts[-1] == "acknowledged", attempts
    assert keys == ["warm-up", "an-1"], attempts


def test_consumer_progress_is_stalled_only_with_waiting_records_and_no_progress():
    progress = ConsumerProgress(stall_after_s=0.2)
    progress.observe(3)
    assert progress.stalled() is None  # just started
    time.sleep(0.3)
    progress.observe(3)
    assert "no progress" in progress.stalled() and "3 record(s) waiting" in progress.stalled()
    progress.progressed()
    assert progress.stalled() is None
    time.sleep(0.3)
    progress.observe(0)  # idle with nothing to read is not stalled
    assert progress.stalled() is None
    time.sleep(0.3)
    assert "consumer loop silent" in progress.stalled()  # the loop stopped observing
