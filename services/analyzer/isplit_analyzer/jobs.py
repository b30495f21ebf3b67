"""Analysis jobs: run apart from request handling, in child processes, then publish.

Lifecycle: ``queued`` -> ``running`` (a child process computes the curve, writes the report
and the candidate messages) -> ``analysed`` -> the parent publishes each candidate (acks=all,
idempotent producer) and marks it -> ``succeeded``. With ``ISPLIT_ANALYZER_EXECUTOR=kubernetes``
the child runs the analysis as an Indexed Job and merges its shards (``executors``). A publish failure leaves the job
``analysed`` with the error, and it is retried; a crash re-queues ``running`` jobs at start-up.
"""

from __future__ import annotations

import logging
import multiprocessing
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
    QUEUED,
    RUNNING,
    SUCCEEDED,
    CandidateRow,
    Job,
    make_engine,
    session_factory,
    utcnow,
)

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
    job_id: str
    db_url: str
    artifact_root: str
    device: str


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
    sessions = session_factory(make_engine(args.db_url))
    root = Path(args.artifact_root)
    with sessions() as s:
        job = s.get(Job, args.job_id)
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
                s.execute(update(Job).where(Job.id == args.job_id).values(images_done=done))

    try:
        from isplit.analysis import write_report

        result = (compute or compute_inline)(args, req, progress)
        write_report(result, report_dir(root, args.job_id))
        rows = _candidate_rows(args.job_id, req, result)
        with sessions.begin() as s:
            s.query(CandidateRow).filter(CandidateRow.analysis_id == args.job_id).delete()
            s.add_all(rows)
            s.execute(
                update(Job)
                .where(Job.id == args.job_id, Job.status == RUNNING)
                .values(
                    status=ANALYSED,
                    images_done=result.curve.num_images,
                    images_total=result.curve.num_images,
                    seconds=result.seconds,
                    images_per_second=result.images_per_second,
                    error=None,
                )
            )
    except IsplitError as exc:
        _fail(sessions, args.job_id, str(exc))
    except Exception as exc:  # the job fails with a message; the service keeps running
        log.exception("analysis %s crashed", args.job_id)
        _fail(sessions, args.job_id, f"internal error: {type(exc).__name__}: {exc}")


def _fail(sessions: sessionmaker[Session], job_id: str, message: str) -> None:
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(status=FAILED, error=message))


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
        self._children: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: Any = None
        self._next_publish_try = 0.0
        self._ctx = multiprocessing.get_context("spawn")

    # lifecycle
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        for proc in self._children.values():
            proc.terminate()
        for proc in self._children.values():
            proc.join(timeout=5)
        if self._producer is not None:
            self._producer.close(timeout=5)

    def recover(self) -> None:
        """Jobs caught ``running`` by a crash go back to the queue."""
        with self.sessions.begin() as s:
            n = s.execute(
                update(Job).where(Job.status == RUNNING).values(status=QUEUED, images_done=0, error=None)
            ).rowcount
        if n:
            log.warning("re-queued %d job(s) caught running by a restart", n)

    def cancel(self, job_id: str) -> None:
        from isplit_analyzer.executors import cancel_analysis

        proc = self._children.pop(job_id, None)
        if proc is not None:
            proc.terminate()
            proc.join(timeout=5)
            metrics.IN_PROGRESS.dec()
        cancel_analysis(self.settings, job_id)

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
                job = s.scalars(select(Job).where(Job.status == QUEUED).order_by(Job.created_at).limit(1)).first()
                if job is None:
                    return
                claimed = s.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == QUEUED)
                    .values(status=RUNNING, attempts=Job.attempts + 1, images_done=0)
                ).rowcount
                job_id = job.id
            if not claimed:
                continue
            args = ChildArgs(
                job_id,
                self.db_url,
                str(self.settings.artifact_root.resolve()),
                self.settings.analyzer_device,
            )
            compute = analysis_compute(self.settings)
            proc = self._ctx.Process(
                target=run_analysis_job, args=(args, compute), name=f"analysis-{job_id}", daemon=True
            )
            proc.start()
            self._children[job_id] = proc
            metrics.IN_PROGRESS.inc()

    def _reap(self) -> None:
        for job_id, proc in list(self._children.items()):
            if proc.is_alive():
                continue
            proc.join()
            del self._children[job_id]
            metrics.IN_PROGRESS.dec()
            with self.sessions.begin() as s:
                job = s.get(Job, job_id)
                if job is None:
                    continue
                if job.status == RUNNING:  # the child died without saying why
                    job.status = FAILED
                    job.error = f"analysis process exited with code {proc.exitcode}"
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
        with self.sessions() as s:
            pending = s.scalars(select(Job.id).where(Job.status == ANALYSED).order_by(Job.created_at)).all()
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
                update(Job).where(Job.id == job_id, Job.status == ANALYSED).values(status=SUCCEEDED, error=None)
            ).rowcount
        if done:
            metrics.JOBS.labels(SUCCEEDED).inc()
        return True

    def _set_error(self, job_id: str, message: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(error=message, updated_at=utcnow()))
