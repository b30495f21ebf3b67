"""Consumes ``isplit.training-results.v1`` and attaches measurements to candidates.

Messages are untrusted: a record that cannot be decoded, or that breaks anything but the
database or Kafka, is dead-lettered with the reason and committed past; ``progress`` tells
``/readyz`` whether the loop keeps up.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from isplit import bus
from isplit.bus import (
    ConsumerProgress,
    Topics,
    close_clients,
    consumer_lag,
    dead_letter,
    make_consumer,
    make_producer,
    poll_records,
)
from isplit.messages import MessageError, TrainingResult, decode
from isplit_analyzer import metrics
from isplit_analyzer.store import CandidateRow

log = logging.getLogger("isplit.analyzer.results")
LAG_CHECK_S = 2.0  # how often the loop measures its lag for the readiness probe


ATTACHED, DUPLICATE, UNKNOWN = "attached", "duplicate", "unknown"


def attach_result(sessions: sessionmaker[Session], result: TrainingResult) -> str:
    """Attach ``result`` to its candidate, once: keyed by candidate id, the newest result (by
    its ``created_at``) wins, so a record delivered or published twice, or an older one arriving
    late, changes nothing, whatever the order and whichever replica consumes it.

    Returns ``ATTACHED``, ``DUPLICATE`` (the candidate holds this result or a newer one) or
    ``UNKNOWN`` (no such candidate)."""
    with sessions.begin() as s:
        n = s.execute(
            update(CandidateRow)
            .where(
                CandidateRow.candidate_id == result.candidate_id,
                or_(CandidateRow.result_created_at.is_(None), CandidateRow.result_created_at < result.created_at),
            )
            .values(result=result.model_dump(mode="json"), result_created_at=result.created_at)
        ).rowcount
        if n:
            return ATTACHED
        known = s.scalar(select(CandidateRow.candidate_id).where(CandidateRow.candidate_id == result.candidate_id))
    return DUPLICATE if known else UNKNOWN


class ResultsConsumer:
    """A background thread: poll, attach, commit; unreadable records go to the dead-letter topic."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        sessions: sessionmaker[Session],
        topics: Topics,
        stall_after_s: float = 60.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.group = group
        self.sessions = sessions
        self.progress = ConsumerProgress(stall_after_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="results-consumer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer: Any = None
        producer: Any = None
        last_lag = 0.0
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = make_consumer(self.bootstrap, self.group, [self.topics.results])
                    producer = make_producer(self.bootstrap, client_id="isplit-analyzer-dlq")
                records = poll_records(consumer, timeout_ms=500)
                for record in records:
                    self._handle(record, producer)
                if records:
                    consumer.commit()
                    self.progress.progressed()
                if time.monotonic() - last_lag > LAG_CHECK_S:
                    last_lag = time.monotonic()
                    self.progress.observe(consumer_lag(consumer))
                    if self.progress.should_renew(bus.RENEW_STUCK_CONSUMER_S):
                        log.warning("results consumer: records wait and none was fetched; making a new consumer")
                        close_clients(consumer, producer, timeout_s=5)
                        consumer = producer = None
            except Exception as exc:  # broker gone: reconnect after a pause
                log.warning("results consumer: %s; reconnecting", exc)
                close_clients(consumer, producer, timeout_s=5)
                consumer = producer = None
                self._stop.wait(2)
        close_clients(consumer, producer, timeout_s=5)

    def _handle(self, record: Any, producer: Any) -> None:
        """Attach one record's result; dead-letter it when it cannot be. Raises only when the
        database is unreachable or the dead letter cannot be published (the loop reconnects
        and the record is read again)."""
        try:
            result = decode(TrainingResult, record.value)
            outcome = attach_result(self.sessions, result)
        except OperationalError:
            raise
        except Exception as exc:  # MessageError, or anything else this record makes go wrong
            reason = str(exc) if isinstance(exc, MessageError) else f"unexpected error: {type(exc).__name__}: {exc}"
            dead_letter(producer, self.topics.results, record, reason, "isplit-analyzer", topic=self.topics.dead_letter)
            return
        if outcome == ATTACHED:
            metrics.RESULTS_CONSUMED.inc()
        elif outcome == DUPLICATE:
            metrics.RESULTS_DUPLICATE.inc()
            log.info("result for candidate %s already attached: ignored", result.candidate_id)
        else:
            log.info("result for unknown candidate %s ignored", result.candidate_id)
