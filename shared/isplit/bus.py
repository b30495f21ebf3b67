"""Kafka helpers on kafka-python: topics, an acknowledged publish, an at-least-once consumer.

The consumer loop every service uses (offsets committed only after the work is published):

    consumer = make_consumer(bootstrap, "isplit-trainer", [TOPIC_CANDIDATES])
    producer = make_producer(bootstrap, "isplit-trainer")
    for record in consumer:
        try:
            candidate = decode(SplitCandidate, record.value)
        except MessageError as exc:
            dead_letter(producer, record.topic, record, str(exc), "trainer")
        else:
            publish(producer, TOPIC_RESULTS, candidate.analysis_id, train(candidate))
        consumer.commit()

Keys are the analysis id (UTF-8), values the JSON of an ``isplit.messages`` model.

Every client (producer, consumer, admin) authenticates as :class:`KafkaSecurity` says, read
from ``ISPLIT_KAFKA_SECURITY_PROTOCOL``, ``ISPLIT_KAFKA_SASL_MECHANISM``,
``ISPLIT_KAFKA_SASL_USERNAME`` and ``ISPLIT_KAFKA_SASL_PASSWORD`` (default: PLAINTEXT, no SASL).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import kafka
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.producer.future import RecordMetadata
from kafka.serializer import Deserializer
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from isplit.messages import TOPIC_CANDIDATES, TOPIC_DEAD_LETTER, TOPIC_PARTITIONS, TOPIC_RESULTS, DeadLetter, encode

log = logging.getLogger(__name__)

# kafka-python 3 renamed some settings and metadata fields and deprecated NewTopic; 2.2+ works too.
_KAFKA_PYTHON_MAJOR = int(kafka.__version__.split(".")[0])


class PublishError(RuntimeError):
    """A message was not acknowledged by the broker."""


class TopicsError(RuntimeError):
    """Topics could not be created or did not become ready in time."""


class KafkaSecurity(BaseSettings):
    """How every client authenticates to the brokers, from ``ISPLIT_KAFKA_*`` variables.

    ``SASL_PLAINTEXT`` or ``SASL_SSL`` with ``SCRAM-SHA-512`` (or ``SCRAM-SHA-256``, ``PLAIN``)
    needs a username and password; in Kubernetes the password comes from a Secret.
    """

    model_config = SettingsConfigDict(env_prefix="ISPLIT_KAFKA_", extra="ignore", hide_input_in_errors=True)

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: SecretStr = Field(default=SecretStr(""), repr=False)

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> KafkaSecurity:
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_username and self.sasl_password.get_secret_value()
        ):
            raise ValueError(
                f"ISPLIT_KAFKA_SECURITY_PROTOCOL={self.security_protocol} needs "
                "ISPLIT_KAFKA_SASL_USERNAME and ISPLIT_KAFKA_SASL_PASSWORD"
            )
        return self

    def client_config(self) -> dict[str, Any]:
        """kafka-python settings for this security setup (nothing for PLAINTEXT)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        config: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL_"):
            config |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value(),
            }
        return config


class ConsumedRecord(Protocol):
    """What ``dead_letter`` needs of a kafka-python ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    key: bytes | str | None
    value: bytes | None


def ensure_topics(
    bootstrap: str,
    partitions: Mapping[str, int] = TOPIC_PARTITIONS,
    timeout_s: float = 30.0,
    replication_factor: int = 1,
) -> dict[str, int]:
    """Create the topics that are missing, each with its partition count, and wait until every
    partition has a leader. Existing topics are left as they are (a different partition count is
    logged, not changed). Retries until the broker answers, within ``timeout_s`` seconds.

    Returns:
        topic -> partition count now in the cluster, for every topic asked for.

    Raises:
        TopicsError: the broker did not answer, refused a topic, or a topic had no leader in time.
    """
    deadline = time.monotonic() + timeout_s
    admin = _admin_client(bootstrap, "isplit-topics", deadline)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in partitions if name not in existing]
        if missing:
            _create_topics(admin, {name: partitions[name] for name in missing}, replication_factor)
        counts = _wait_for_leaders(admin, list(partitions), deadline)
    finally:
        admin.close()
    for name, wanted in partitions.items():
        if counts[name] != wanted:
            log.warning("topic %s has %d partitions, not %d; leaving it as it is", name, counts[name], wanted)
    if missing:
        log.info("created topics %s", ", ".join(f"{name} ({partitions[name]})" for name in missing))
    return counts


def make_producer(bootstrap: str, client_id: str, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas (acks='all'), is idempotent (no duplicates
    from its own retries), retries transient errors and batches for at most 5 ms. Values and
    keys are bytes (``publish`` encodes them). ``overrides`` are KafkaProducer settings."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_block_ms": 30_000,
        "retry_backoff_ms": 200,
    }
    if KafkaProducer.DEFAULT_CONFIG.get("retries") == 0:
        # Older kafka-python does not retry by default; newer retries until delivery_timeout_ms.
        config["retries"] = 5
    return KafkaProducer(**{**_supported(KafkaProducer, config), **KafkaSecurity().client_config(), **overrides})


def publish(
    producer: KafkaProducer, topic: str, key: str | None, msg: BaseModel, timeout_s: float | None = None
) -> RecordMetadata:
    """Send ``msg`` (JSON) under ``key`` (UTF-8) and wait for the broker's acknowledgement.

    By default this waits as long as the producer itself keeps the record (its
    ``delivery_timeout_ms``, 2 minutes), not less: a shorter wait gives up on a record that is
    still queued during a broker outage and is delivered once the broker is back, so a caller
    that retries on the error would write it twice. When this raises, the producer has dropped
    the record; the idempotent producer never writes a retried batch twice.

    Raises:
        PublishError: naming topic and key, when the send fails or is not acknowledged in time.
    """
    if timeout_s is None:
        timeout_s = producer.config.get("delivery_timeout_ms", 120_000) / 1000 + 5
    try:
        future = producer.send(topic, key=None if key is None else key.encode("utf-8"), value=encode(msg))
        return future.get(timeout=timeout_s)
    except KafkaError as exc:
        raise PublishError(f"publishing {type(msg).__name__} to {topic} (key {key!r}) failed: {exc!r}") from exc


# Seconds make_consumer waits for its topics to appear in the consumer's metadata.
TOPIC_METADATA_WAIT_S = 10.0


def make_consumer(bootstrap: str, group_id: str, topics: Iterable[str], **overrides: Any) -> KafkaConsumer:
    """A group consumer for at-least-once processing: nothing is committed until the caller
    calls ``consumer.commit()``, a new group starts from the earliest offset, and one record may
    take up to 30 minutes of work before the group considers the consumer dead. Keys arrive
    as ``str``, values as raw ``bytes`` (decode with ``isplit.messages.decode``).

    Each poll returns at most one record (``max_poll_records=1``): ``commit()`` commits the
    position after everything polled so far, so committing after each processed record never
    commits a record that was fetched but not yet processed. ``overrides`` are KafkaConsumer
    settings.

    The consumer subscribes only once its metadata lists every topic (up to
    ``TOPIC_METADATA_WAIT_S``): a group joined while a just-created topic is still missing from
    the metadata gets no partitions until the next metadata refresh, which is also kept short
    (``metadata_max_age_ms``) so such a miss heals in seconds.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "client_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_interval_ms": 30 * 60 * 1000,
        "max_poll_records": 1,
        "metadata_max_age_ms": 10_000,
        "key_deserializer": Utf8KeyDeserializer(),
    }
    consumer = KafkaConsumer(**{**_supported(KafkaConsumer, config), **KafkaSecurity().client_config(), **overrides})
    topics = list(topics)
    deadline = time.monotonic() + TOPIC_METADATA_WAIT_S
    while time.monotonic() < deadline and not all(consumer.partitions_for_topic(t) for t in topics):
        time.sleep(0.2)
    consumer.subscribe(topics)
    return consumer


# Seconds a consumer loop waits after a poll that raised, before it polls again.
POLL_ERROR_PAUSE_S = 1.0
# Seconds a consumer may leave waiting records unfetched before its loop makes a new one.
RENEW_STUCK_CONSUMER_S = 30.0


def poll_records(consumer: KafkaConsumer, timeout_ms: int) -> list[Any]:
    """The records one ``consumer.poll(timeout_ms)`` returns, partition by partition in order;
    ``[]`` after a pause of ``POLL_ERROR_PAUSE_S`` when the poll raises a Kafka or socket error.

    kafka-python 3.0 can raise from ``poll`` while the broker restarts (a metadata refresh inside
    the group-coordinator lookup meets a refused connection: seen in CI, ``KafkaConnectionError``
    out of ``ensure_coordinator_ready``). The consumer itself recovers on a later poll, so a loop
    polls again instead of dying with the work it holds.
    """
    try:
        batch = consumer.poll(timeout_ms=timeout_ms)
    except (KafkaError, OSError) as exc:
        log.warning("poll failed (%r); polling again in %.0f s", exc, POLL_ERROR_PAUSE_S)
        time.sleep(POLL_ERROR_PAUSE_S)
        return []
    return [record for records in batch.values() for record in records]


def close_clients(consumer: KafkaConsumer | None, producer: KafkaProducer | None, timeout_s: float = 10.0) -> None:
    """Close a consumer (nothing committed) and a producer, each within about ``timeout_s``
    (kafka-python's producer waits forever by default), whatever state the broker is in;
    errors are logged, never raised. Either may be None."""
    for name, close in (
        ("consumer", None if consumer is None else lambda: consumer.close(autocommit=False)),
        ("producer", None if producer is None else lambda: producer.close(timeout=timeout_s)),
    ):
        if close is not None:
            try:
                close()
            except Exception as exc:  # closing is best effort: the process goes on or exits
                log.warning("closing the %s: %r", name, exc)


@dataclass(frozen=True)
class Topics:
    """The contract topics under an optional prefix.

    A prefix (``ISPLIT_TOPIC_PREFIX``) lets several isplit installations, or test runs, share
    one Kafka cluster without reading each other's messages; the default is none.
    """

    prefix: str = ""

    @property
    def candidates(self) -> str:
        return self.prefix + TOPIC_CANDIDATES

    @property
    def results(self) -> str:
        return self.prefix + TOPIC_RESULTS

    @property
    def dead_letter(self) -> str:
        return self.prefix + TOPIC_DEAD_LETTER

    def partitions(self) -> dict[str, int]:
        """Topic name -> partition count, for :func:`ensure_topics`."""
        return {self.prefix + name: n for name, n in TOPIC_PARTITIONS.items()}


def dead_letter(
    producer: KafkaProducer,
    source_topic: str,
    record: ConsumedRecord,
    reason: str,
    service: str,
    timeout_s: float | None = None,
    *,
    topic: str = TOPIC_DEAD_LETTER,
) -> RecordMetadata:
    """Publish a ``DeadLetter`` holding ``record``'s original value bytes and ``reason`` to
    ``isplit.dead-letter.v1``, keyed like the original record. Waits for the acknowledgement."""
    key = record.key.decode("utf-8", errors="replace") if isinstance(record.key, bytes) else record.key
    letter = DeadLetter.from_bytes(
        record.value,
        source_topic=source_topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        reason=reason,
        service=service,
    )
    log.warning("dead-lettering %s[%s]@%s (key %r): %s", source_topic, record.partition, record.offset, key, reason)
    return publish(producer, topic, key, letter, timeout_s=timeout_s)


def consumer_lag(consumer: KafkaConsumer) -> int | None:
    """Records on ``consumer``'s assigned partitions that it has not consumed yet (end offset
    minus position, summed); None when the broker does not answer."""
    try:
        parts = list(consumer.assignment())
        if not parts:
            return 0
        ends = consumer.end_offsets(parts)
        return sum(max(0, ends[tp] - consumer.position(tp)) for tp in parts)
    except (KafkaError, OSError, AssertionError) as exc:
        log.debug("lag not known: %r", exc)
        return None


class ConsumerProgress:
    """Whether a consumer loop keeps up, for a readiness probe.

    The loop reports :meth:`progressed` after each committed record (and while long work on one
    is alive) and :meth:`observe` its lag every few seconds. It is *stalled* when its partitions
    hold records it has not consumed (lag > 0) and it has not progressed for ``stall_after_s``
    seconds, or when the loop has not observed anything for that long (stuck or not started).
    """

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        now = time.monotonic()
        self._last_progress = self._last_observed = self._last_renewal = now
        self._lag: int | None = None
        self._lock = threading.Lock()

    def progressed(self) -> None:
        with self._lock:
            self._last_progress = time.monotonic()

    def observe(self, lag: int | None) -> None:
        """Record the lag just measured (None: unknown, the broker did not answer)."""
        with self._lock:
            now = time.monotonic()
            self._last_observed, self._lag = now, lag
            if lag == 0:
                self._last_progress = now

    def should_renew(self, after_s: float) -> bool:
        """True, at most once per ``after_s``, when records are waiting (a measured lag > 0) and
        none has been processed for ``after_s`` seconds: the consumer is connected but its
        fetching is stuck (seen with kafka-python 3.0.12 after a broker restart, following a
        FetchSessionIdNotFound), and the loop should close it and make a new one. The records
        it had fetched but not committed are read again; processing is idempotent."""
        with self._lock:
            now = time.monotonic()
            waiting = self._lag is not None and self._lag > 0
            if waiting and now - self._last_progress > after_s and now - self._last_renewal > after_s:
                self._last_renewal = now
                return True
            return False

    def stalled(self) -> str | None:
        """Why the consumer is stalled, or None while it keeps up."""
        with self._lock:
            now = time.monotonic()
            idle = now - self._last_progress
            if now - self._last_observed > self.stall_after_s:
                return f"consumer loop silent for {now - self._last_observed:.0f} s"
            if idle > self.stall_after_s and self._lag != 0:
                lag = "unknown" if self._lag is None else str(self._lag)
                return f"no progress for {idle:.0f} s with {lag} record(s) waiting"
            return None


def kafka_reachable(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request within ``timeout_s``."""
    try:
        admin = _admin_client(bootstrap, "isplit-readiness", time.monotonic() + timeout_s, retry=False)
    except TopicsError as exc:
        log.debug("kafka at %s not reachable: %s", bootstrap, exc)
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError) as exc:
        log.debug("kafka at %s not answering: %r", bootstrap, exc)
        return False
    finally:
        admin.close()


# -- internals ---------------------------------------------------------------------------------


def _admin_client(bootstrap: str, client_id: str, deadline: float, retry: bool = True) -> KafkaAdminClient:
    """An admin client, retrying the bootstrap until ``deadline`` (time.monotonic seconds)."""
    while True:
        remaining_ms = max(int((deadline - time.monotonic()) * 1000), 500)
        timeouts = {
            "request_timeout_ms": remaining_ms,
            "bootstrap_timeout_ms": remaining_ms,  # kafka-python 3.x
            "api_version_auto_timeout_ms": remaining_ms,  # kafka-python 2.x
        }
        try:
            config = {"bootstrap_servers": bootstrap, "client_id": client_id, **timeouts}
            return KafkaAdminClient(**_supported(KafkaAdminClient, config), **KafkaSecurity().client_config())
        except (KafkaError, OSError) as exc:
            if not retry or time.monotonic() >= deadline:
                raise TopicsError(f"no Kafka broker answered at {bootstrap}: {exc!r}") from exc
            time.sleep(0.5)


def _create_topics(admin: KafkaAdminClient, partitions: Mapping[str, int], replication_factor: int) -> None:
    new_topics: Any
    if _KAFKA_PYTHON_MAJOR >= 3:
        new_topics = {
            name: {"num_partitions": count, "replication_factor": replication_factor}
            for name, count in partitions.items()
        }
    else:
        from kafka.admin import NewTopic

        new_topics = [NewTopic(name, count, replication_factor) for name, count in partitions.items()]
    try:
        admin.create_topics(new_topics)
    except TopicAlreadyExistsError:
        pass  # another process created them between list_topics and here
    except KafkaError as exc:
        raise TopicsError(f"creating topics {sorted(partitions)} failed: {exc!r}") from exc


def _wait_for_leaders(admin: KafkaAdminClient, topics: list[str], deadline: float) -> dict[str, int]:
    """topic -> partition count, once every partition of every topic has a leader."""
    while True:
        pending: dict[str, str] = {}
        counts: dict[str, int] = {}
        try:
            described = admin.describe_topics(topics)
        except KafkaError as exc:
            described, pending["*"] = [], repr(exc)
        by_name = {_field(t, "name", "topic"): t for t in described}
        for name in topics:
            info = by_name.get(name)
            if info is None or info.get("error_code", 0) != 0 or not info.get("partitions"):
                pending[name] = "not in metadata yet" if info is None else f"error {info.get('error_code')}"
                continue
            leaders = [_field(p, "leader_id", "leader") for p in info["partitions"]]
            if any(leader is None or leader < 0 for leader in leaders):
                pending[name] = "partition without leader"
            counts[name] = len(leaders)
        if not pending:
            return counts
        if time.monotonic() >= deadline:
            raise TopicsError(f"topics not ready in time: {pending}")
        time.sleep(0.2)


def _field(item: Mapping[str, Any], new: str, old: str) -> Any:
    """A metadata field under its kafka-python 3.x name, or its 2.x name."""
    return item[new] if new in item else item.get(old)


def _supported(client_cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """Our defaults without the settings the installed kafka-python lacks (it rejects them)."""
    known = client_cls.DEFAULT_CONFIG
    unknown = sorted(set(config) - set(known))
    if unknown:
        log.debug("%s: kafka-python %s has no setting(s) %s", client_cls.__name__, kafka.__version__, unknown)
    return {key: value for key, value in config.items() if key in known}


class Utf8KeyDeserializer(Deserializer):
    """Record keys as ``str`` (None stays None); undecodable bytes become U+FFFD."""

    def deserialize(self, topic: str, *headers_and_data: Any) -> str | None:
        # kafka-python 3.x passes (topic, headers, data), 2.x passes (topic, data).
        data = headers_and_data[-1]
        return None if data is None else data.decode("utf-8", errors="replace")
