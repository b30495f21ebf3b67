"""Analysis jobs: run apart from request handling, in child processes, then publish.

Lifecycle: ``queued`` -> ``running`` (a child process computes the curve, writes the report
and the candidate messages) -> ``analysed`` -> the parent publishes each candidate (acks=all,
idempotent producer) and marks it -> ``succeeded``. With ``ISPLIT_ANALYZER_EXECUTOR=kubernetes``
the child runs the analysis as an Indexed Job and merges its shards (``executors``). A publish
failure leaves the job ``analysed`` with the error, and it is retried.

Several replicas may share the job store (PostgreSQL): each claims jobs atomically and holds
them under a lease that a thread renews (``store.claim_next_job``); a replica that dies stops
renewing, and another takes its running and analysed jobs over when the leases lapse. A
stopping replica gives its jobs back at once. Every write about a running job is fenced by the
claim, so a replica that lost a job cannot finish it too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from isplit import IsplitError
from isplit.analysis import AnalysisResult, split_candidates
from isplit.bus import ensure_topics, make_producer, publish
from isplit.messages import DatasetSpec, ModelSpec, SplitCandidate
from isplit.plan import resolve_deployment
from isplit_analyzer import metrics
from isplit_analyzer.config import Settings
from isplit_analyzer.schemas import AcceptedAnalysis
from isplit_analyzer.store import (
    ANALYSED,
    FAILED,
    SUCCEEDED,
    CandidateRow,
    Claim,
    Job,
    claim_next_job,
    claim_publishing,
    held,
    make_engine,
    release_claims,
    renew_leases,
    session_factory,
    utcnow,
)
from isplit_analyzer.workers import AnalysisWorkers

log = logging.getLogger("isplit.analyzer.jobs")


def new_job_id() -> str:
    return "a-" + uuid.uuid4().hex[:12]


def new_model_id() -> str:
    return "m-" + uuid.uuid4().hex[:12]


def model_path(artifact_root: Path, model_id: str) -> Path:
    return artifact_root / "models" / f"{model_id}.pt"


def report_dir(artifact_root: Path, job_id: str) -> Path:
    return artifact_root / "analyses" / job_id


# -- the child process -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChildArgs:
    claim: Claim
    db_url: str
    artifact_root: str
    device: str

    @property
    def job_id(self) -> str:
        return self.claim.job_id


Compute = Callable[[ChildArgs, AcceptedAnalysis, Callable[[int], None]], AnalysisResult]


def compute_inline(args: ChildArgs, req: AcceptedAnalysis, progress: Callable[[int], None]) -> AnalysisResult:
    """The analysis in this process (``isplit.analysis.run_analysis``)."""
    from isplit.analysis import run_analysis

    return run_analysis(
        model_path(Path(args.artifact_root), req.model_id),
        req.dataset,
        arch=req.arch,
        classes=req.classes,
        max_images=req.options.max_images,
        batch_size=req.options.batch_size,
        target=req.options.target,
        device=args.device,
        progress=progress,
    )


def run_analysis_job(args: ChildArgs, compute: Compute | None = None) -> None:
    """Entry point of the analysis process: compute (here, or as ``executors`` says), write the
    report, store the candidates."""
    parent = os.getppid()
    claim = args.claim
    sessions = session_factory(make_engine(args.db_url))
    root = Path(args.artifact_root)
    with sessions() as s:
        job = s.get(Job, claim.job_id)
        assert job is not None
        req = AcceptedAnalysis.model_validate(job.request)
    last = [0.0]

    def progress(done: int) -> None:
        if os.getppid() != parent:  # the service died: stop, the job is re-queued on restart
            os._exit(3)
        now = time.monotonic()
        if now - last[0] > 0.3:
            last[0] = now
            with sessions.begin() as s:
                s.execute(update(Job).where(held(claim)).values(images_done=done))

    try:
        from isplit.analysis import write_report

        result = (compute or compute_inline)(args, req, progress)
        write_report(result, report_dir(root, claim.job_id))
        rows = _candidate_rows(claim.job_id, req, result)
        with sessions.begin() as s:
            # The job row first: it locks the row, and a lost claim stores nothing.
            mine = s.execute(
                update(Job)
                .where(held(claim))
                .values(
                    status=ANALYSED,
                    images_done=result.curve.num_images,
                    images_total=result.curve.num_images,
                    seconds=result.seconds,
                    images_per_second=result.images_per_second,
                    error=None,
                )
            ).rowcount
            if mine:
                s.query(CandidateRow).filter(CandidateRow.analysis_id == claim.job_id).delete()
                s.add_all(rows)
    except IsplitError as exc:
        _fail(sessions, claim, str(exc))
    except Exception as exc:  # the job fails with a message; the service keeps running
        log.exception("analysis %s crashed", claim.job_id)
        _fail(sessions, claim, f"internal error: {type(exc).__name__}: {exc}")


def _fail(sessions: sessionmaker[Session], claim: Claim, message: str) -> None:
    with sessions.begin() as s:
        s.execute(update(Job).where(held(claim)).values(status=FAILED, error=message, lease_until=None))


def _candidate_rows(job_id: str, req: AcceptedAnalysis, result: AnalysisResult) -> list[CandidateRow]:
    info = result.model
    model = ModelSpec(
        arch=info.arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_size=info.input_size,
        weights_uri=f"models/{req.model_id}.pt",
        weights_sha256=req.weights_sha256,
    )
    dataset = DatasetSpec(
        name=req.dataset,
        classes=result.classes,
        max_train_images=req.options.max_train_images,
        max_test_images=req.options.max_test_images,
    )
    candidates = split_candidates(
        result,
        job_id,
        model=model,
        dataset=dataset,
        bottleneck=req.options.bottleneck(),
        top_k=req.options.top_k,
        deployment=resolve_deployment(req.deployment) if req.deployment is not None else None,
    )
    return [
        CandidateRow(
            candidate_id=msg.candidate_id,
            analysis_id=job_id,
            cut=msg.cut,
            predicted_rank=msg.predicted_rank,
            size_rank=msg.size_rank,
            cui=msg.cui,
            log10_cui=msg.log10_cui,
            output_bytes=msg.output_bytes,
            message=msg.model_dump_json(),
            published=False,
        )
        for msg in candidates
    ]


# -- the runner in the service process -------------------------------------------------------


class JobRunner:
    """Starts analysis processes for queued jobs and publishes finished ones."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], db_url: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.db_url = db_url
        self.replica = settings.replica_id()
        self._children: dict[str, tuple[Any, Claim]] = {}  # job id -> (analysis process, claim)
        self._lost: set[tuple[str, int]] = set()  # (job id, attempt) the lease keeper found lost
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease_thread: threading.Thread | None = None
        self._producer: Any = None
        self._next_publish_try = 0.0
        self._workers = AnalysisWorkers(settings.analyzer_worker_memory_mb * 2**20)

    # lifecycle
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._lease_thread = threading.Thread(target=self._keep_leases, name="job-leases", daemon=True)
        self._thread.start()
        self._lease_thread.start()
        log.info("replica %s: job leases of %.0f s", self.replica, self.settings.analyzer_lease_seconds)

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._lease_thread):
            if thread:
                thread.join(timeout=10)
        for proc, _ in self._children.values():
            proc.terminate()
        for proc, _ in self._children.values():
            proc.join(timeout=5)
        self._release("gave back %d job(s) at shutdown")
        if self._producer is not None:
            self._producer.close(timeout=5)

    def recover(self) -> None:
        """Jobs a crashed predecessor with this replica id held go back to the queue now; those
        of other replicas are taken over when their leases lapse."""
        self._release("re-queued %d job(s) held by this replica id before a restart")

    def _release(self, message: str) -> None:
        try:
            with self.sessions.begin() as s:
                n = release_claims(s, self.replica)
        except Exception:  # the database is gone: the leases lapse instead
            log.exception("could not release the jobs of replica %s", self.replica)
            return
        if n:
            log.warning(message, n)

    def cancel(self, job_id: str) -> None:
        from isplit_analyzer.executors import cancel_analysis

        child = self._children.pop(job_id, None)
        if child is not None:
            child[0].terminate()
            child[0].join(timeout=5)
            metrics.IN_PROGRESS.dec()
        cancel_analysis(self.settings, job_id)

    # the leases, on their own thread so that a slow Kafka publish cannot let them lapse
    def _keep_leases(self) -> None:
        lease = self.settings.analyzer_lease_seconds
        while not self._stop.wait(lease / 3):
            running = {job_id: claim.attempt for job_id, (_, claim) in list(self._children.items())}
            try:
                with self.sessions.begin() as s:
                    lost = renew_leases(s, self.replica, running, lease)
            except Exception:  # a database hiccup: the lease lasts until the next try
                log.exception("renewing the job leases of replica %s failed", self.replica)
                continue
            with self._lock:
                self._lost |= {(job_id, running[job_id]) for job_id in lost}

    # the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._launch()
                self._publish_pending()
            except Exception:  # the loop must survive a database or Kafka hiccup
                log.exception("job runner iteration failed")
            self._stop.wait(0.2)

    def _launch(self) -> None:
        from isplit_analyzer.executors import analysis_compute

        while len(self._children) < self.settings.analyzer_workers:
            with self.sessions.begin() as s:
                claim = claim_next_job(s, self.replica, self.settings.analyzer_lease_seconds)
            if claim is None:
                return
            if claim.taken_over_from is not None:
                metrics.TAKEOVERS.inc()
                log.warning("took over job %s from replica %s (its lease lapsed)", claim.job_id, claim.taken_over_from)
            self.cancel(claim.job_id)  # a process of an earlier claim of ours that lapsed
            args = ChildArgs(
                claim,
                self.db_url,
                str(self.settings.artifact_root.resolve()),
                self.settings.analyzer_device,
            )
            compute = analysis_compute(self.settings)
            proc = self._workers.start(run_analysis_job, (args, compute), name=f"analysis-{claim.job_id}")
            self._children[claim.job_id] = (proc, claim)
            metrics.IN_PROGRESS.inc()

    def _reap(self) -> None:
        with self._lock:
            lost, self._lost = self._lost, set()
        for job_id, (proc, claim) in list(self._children.items()):
            if (job_id, claim.attempt) in lost:
                log.warning("job %s is no longer held by replica %s: its analysis stops", job_id, self.replica)
                self.cancel(job_id)
                continue
            if proc.is_alive():
                continue
            proc.join()
            del self._children[job_id]
            metrics.IN_PROGRESS.dec()
            with self.sessions.begin() as s:
                # The child died without saying why: a failure, if the job is still ours.
                s.execute(
                    update(Job)
                    .where(held(claim))
                    .values(status=FAILED, error=f"analysis process exited with code {proc.exitcode}")
                )
                job = s.get(Job, job_id)
                if job is None or job.claimed_by != self.replica or job.attempts != claim.attempt:
                    continue
                if job.status == FAILED:
                    metrics.JOBS.labels(FAILED).inc()
                elif job.status == ANALYSED and job.seconds is not None:
                    metrics.ANALYSIS_SECONDS.observe(job.seconds)
                    metrics.IMAGES_PER_SECOND.set(job.images_per_second or 0)

    def _ensure_producer(self) -> bool:
        if self._producer is None:
            try:
                ensure_topics(self.settings.kafka_bootstrap, self.settings.topics().partitions(), timeout_s=10)
                self._producer = make_producer(self.settings.kafka_bootstrap, client_id="isplit-analyzer")
            except Exception as exc:  # broker down: retry later, jobs stay retryable
                log.warning("Kafka producer unavailable: %s", exc)
                return False
        return True

    def _publish_pending(self) -> None:
        if time.monotonic() < self._next_publish_try:
            return
        with self.sessions.begin() as s:
            pending = claim_publishing(s, self.replica, self.settings.analyzer_lease_seconds)
        for job_id in pending:
            if not self._publish_job(job_id):
                self._next_publish_try = time.monotonic() + self.settings.publish_retry_seconds
                return

    def _publish_job(self, job_id: str) -> bool:
        if not self._ensure_producer():
            self._set_error(job_id, "publishing candidates: Kafka unreachable (will retry)")
            return False
        with self.sessions() as s:
            rows = s.scalars(
                select(CandidateRow)
                .where(CandidateRow.analysis_id == job_id, CandidateRow.published.is_(False))
                .order_by(CandidateRow.predicted_rank)
            ).all()
        for row in rows:
            try:
                publish(
                    self._producer,
                    self.settings.topics().candidates,
                    job_id,
                    SplitCandidate.model_validate_json(row.message),
                )
            except Exception as exc:
                metrics.PUBLISH_ERRORS.inc()
                self._set_error(job_id, f"publishing candidate {row.candidate_id} failed (will retry): {exc}")
                return False
            with self.sessions.begin() as s:
                s.execute(
                    update(CandidateRow).where(CandidateRow.candidate_id == row.candidate_id).values(published=True)
                )
        with self.sessions.begin() as s:
            done = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == ANALYSED, Job.claimed_by == self.replica)
                .values(status=SUCCEEDED, error=None, lease_until=None)
            ).rowcount
        if done:
            metrics.JOBS.labels(SUCCEEDED).inc()
        return True

    def _set_error(self, job_id: str, message: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(error=message, updated_at=utcnow()))
