"""The trainer's consumer loop: poll, process off the poll loop, publish, then commit.

While a candidate trains (minutes), its partitions are paused and the loop keeps polling, so
the group never sees a stalled member and no rebalance hands the work to someone else. The
offset is committed only after the result (or dead letter) is published. SIGTERM abandons
the current candidate (not committed, so it is redelivered) and exits cleanly.

Messages are untrusted: whatever a record makes go wrong, other than Kafka refusing a publish,
dead-letters that record with the reason and commits past it; only a failed publish is retried.
``progress`` tells the readiness probe whether the loop keeps up.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kafka.structs import OffsetAndMetadata, TopicPartition

from isplit import bus
from isplit.bus import (
    ConsumerProgress,
    PublishError,
    close_clients,
    consumer_lag,
    dead_letter,
    ensure_topics,
    make_consumer,
    make_producer,
    poll_records,
    publish,
)
from isplit.messages import MessageError, SplitCandidate, TrainingResult, decode
from isplit.retrain import Abandoned
from isplit_trainer import metrics
from isplit_trainer.config import Settings
from isplit_trainer.executors import Executor, make_executor
from isplit_trainer.pipeline import CandidateError, existing_result, register_result, write_result

log = logging.getLogger("isplit.trainer")
COMMIT, RETRY, ABANDON = "commit", "retry", "abandon"
LAG_CHECK_S = 2.0  # how often the loop measures its lag (for the readiness probe and the metric)
SERVICE = "isplit-trainer"


class TrainerLoop:
    def __init__(self, settings: Settings, executor: Executor | None = None) -> None:
        self.settings = settings
        self.executor = executor or make_executor(settings)
        self.stop_event = threading.Event()
        self._producer: Any = None
        self.topics = settings.topics()
        self.progress = ConsumerProgress(settings.consumer_stall_s)

    def request_stop(self, *_: object) -> None:
        log.info("stop requested: finishing the poll loop, abandoning the current candidate")
        self.stop_event.set()

    # -- one record, on the worker thread --------------------------------------------------
    def handle(self, record: Any) -> str:
        try:
            candidate = decode(SplitCandidate, record.value)
        except MessageError as exc:
            return self._dead_letter(record, str(exc))
        previous = existing_result(self.settings, candidate.candidate_id)
        if previous is not None:
            previous = register_result(previous, self.settings)  # a training Job's, not yet served
            publish(self._producer, self.topics.results, candidate.analysis_id, previous)
            metrics.CANDIDATES.labels("republished").inc()
            log.info("candidate %s already done: result re-published", candidate.candidate_id)
            return COMMIT
        log.info("training candidate %s (cut %s)", candidate.candidate_id, candidate.cut)
        try:
            result = self.executor.run(candidate, self._should_stop)
        except Abandoned:
            return ABANDON
        except CandidateError as exc:
            self._publish_failure(candidate, str(exc))
            return self._dead_letter(record, f"candidate {candidate.candidate_id}: {exc}")
        except Exception as exc:  # an unexpected failure fails this candidate, not the service
            log.exception("candidate %s failed", candidate.candidate_id)
            self._publish_failure(candidate, f"{type(exc).__name__}: {exc}")
            metrics.CANDIDATES.labels("failed").inc()
            return COMMIT
        publish(self._producer, self.topics.results, candidate.analysis_id, result)
        metrics.CANDIDATES.labels(result.status).inc()
        log.info("candidate %s %s: split accuracy %s", candidate.candidate_id, result.status, result.accuracy_split)
        return COMMIT

    def _should_stop(self) -> bool:
        self.progress.progressed()  # asked every few batches: training is alive
        return self.stop_event.is_set()

    def _dead_letter(self, record: Any, reason: str) -> str:
        dead_letter(self._producer, self.topics.candidates, record, reason, SERVICE, topic=self.topics.dead_letter)
        metrics.CANDIDATES.labels("dead_lettered").inc()
        log.warning("dead-lettered offset %s: %s", record.offset, reason)
        return COMMIT

    def _publish_failure(self, candidate: SplitCandidate, reason: str) -> None:
        result = TrainingResult.failure(candidate, reason, self.settings.trainer_id)
        write_result(self.settings, result)
        publish(self._producer, self.topics.results, candidate.analysis_id, result)

    def _safe_handle(self, record: Any) -> str:
        try:
            return self.handle(record)
        except PublishError:  # Kafka down while publishing: leave it uncommitted and retry
            log.exception("publishing for offset %s failed; will retry", record.offset)
            return RETRY
        except Exception as exc:  # the record broke something: never retry it forever
            log.exception("offset %s could not be processed", record.offset)
            try:
                return self._dead_letter(record, f"unexpected error: {type(exc).__name__}: {exc}")
            except PublishError:
                return RETRY

    # -- the poll loop, on the main thread ----------------------------------------------------
    def run(self) -> None:
        ensure_topics(self.settings.kafka_bootstrap, self.topics.partitions())
        self._producer = make_producer(self.settings.kafka_bootstrap, client_id=f"{SERVICE}-{self.settings.trainer_id}")
        consumer = self._consumer()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        current: tuple[Any, Future[str]] | None = None
        last_lag = 0.0
        log.info("trainer %s consuming %s", self.settings.trainer_id, self.topics.candidates)
        try:
            while True:
                if self.stop_event.is_set() and current is None:
                    break
                records = poll_records(consumer, timeout_ms=200)
                if records and current is None and not self.stop_event.is_set():
                    consumer.pause(*consumer.assignment())
                    current = (records[0], pool.submit(self._safe_handle, records[0]))
                if current is not None and current[1].done():
                    record, future = current
                    self._finish(consumer, record, future.result())
                    current = None
                if time.monotonic() - last_lag > LAG_CHECK_S:
                    last_lag = time.monotonic()
                    lag = consumer_lag(consumer)
                    if lag is not None:
                        lag += current is not None  # the record in work is fetched, not done
                        metrics.CONSUMER_LAG.set(lag)
                    self.progress.observe(lag)
                    if current is None and self.progress.should_renew(bus.RENEW_STUCK_CONSUMER_S):
                        log.warning("candidates wait and none was fetched; making a new consumer")
                        close_clients(consumer, None)
                        consumer = self._consumer()
        finally:
            pool.shutdown(wait=True)
            close_clients(consumer, self._producer, timeout_s=10)
            log.info("trainer stopped")

    def _consumer(self) -> Any:
        return make_consumer(
            self.settings.kafka_bootstrap,
            self.settings.trainer_group,
            [self.topics.candidates],
            max_poll_records=1,
            session_timeout_ms=10_000,
            max_poll_interval_ms=300_000,  # the loop keeps polling while a candidate trains
        )

    def _finish(self, consumer: Any, record: Any, outcome: str) -> None:
        tp = TopicPartition(record.topic, record.partition)
        if outcome == COMMIT:
            try:
                consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
                self.progress.progressed()
            except Exception as exc:  # partition moved on a rebalance: the new owner re-publishes
                log.warning("commit of %s@%s failed: %s", tp, record.offset, exc)
        elif tp in consumer.assignment():
            consumer.seek(tp, record.offset)  # RETRY or ABANDON: read it again
            if outcome == RETRY:
                time.sleep(2)
        consumer.resume(*consumer.assignment())
