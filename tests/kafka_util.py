"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from isplit.bus import make_consumer, make_producer, publish
from isplit.messages import TOPIC_CANDIDATES, MessageError, decode

M = TypeVar("M", bound=BaseModel)


def send(bootstrap: str, topic: str, key: str, msg: BaseModel) -> None:
    producer = make_producer(bootstrap, client_id="test")
    try:
        publish(producer, topic, key, msg)
    finally:
        producer.close()


def send_raw(bootstrap: str, value: bytes, key: str = "raw", topic: str = TOPIC_CANDIDATES) -> None:
    producer = make_producer(bootstrap, client_id="test-raw")
    try:
        producer.send(topic, key=key.encode(), value=value).get(timeout=30)
    finally:
        producer.close()


def collect(
    bootstrap: str,
    topic: str,
    model: type[M],
    want: Callable[[M], bool],
    *,
    count: int = 1,
    timeout_s: float = 120,
    linger_s: float = 0.0,
) -> list[M]:
    """Read ``topic`` from the start with a fresh group until ``count`` messages match ``want``
    (then keep reading ``linger_s`` more seconds, to catch duplicates)."""
    consumer = make_consumer(bootstrap, f"test-{uuid.uuid4().hex[:8]}", [topic], max_poll_records=500)
    found: list[M] = []
    deadline = time.monotonic() + timeout_s
    done_at: float | None = None
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    try:
                        msg = decode(model, r.value)
                    except MessageError:
                        continue
                    if want(msg):
                        found.append(msg)
            if len(found) >= count and done_at is None:
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= linger_s:
                return found
        return found
    finally:
        consumer.close(autocommit=False)


def start_group_at_end(bootstrap: str, group: str, topic: str) -> None:
    """Commit ``group``'s offsets at the current end of ``topic``, so a service started with
    that (new) group sees only what a test publishes from now on, not every earlier run's."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        ends = consumer.end_offsets(parts)
        consumer.assign(parts)
        consumer.commit({tp: OffsetAndMetadata(ends[tp], "", -1) for tp in parts})
    finally:
        consumer.close(autocommit=False)
