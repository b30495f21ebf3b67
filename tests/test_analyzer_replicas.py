"""Two analyzer processes sharing one PostgreSQL job store and one artifact root, against the
real broker: each job runs once, a killed replica's job is taken over and completes once, and
a result published twice is attached once."""

from __future__ import annotations

import re
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from isplit.bus import Topics
from isplit.messages import SplitCandidate, TrainingResult
from isplit_analyzer.store import Job
from tests.kafka_util import collect, send
from tests.test_analyzer import Analyzer

pytestmark = pytest.mark.kafka

# Short enough for a quick takeover, long enough that a loaded machine never misses a renewal.
LEASE_SECONDS = 5


def replica(tmp_path: Path, name: str, bootstrap: str, db_url: str, topics: Topics, group: str) -> Analyzer:
    """An analyzer process named ``name`` in job claims, sharing store, artifacts and topics."""
    return Analyzer(
        tmp_path / "artifacts",
        bootstrap,
        tmp_path / f"{name}.log",
        topics=topics,
        ISPLIT_ANALYZER_DB_URL=db_url,
        ISPLIT_ANALYZER_REPLICA_ID=name,
        ISPLIT_ANALYZER_LEASE_SECONDS=str(LEASE_SECONDS),
        ISPLIT_RESULTS_GROUP=group,
    )


@pytest.fixture
def replicas(tmp_path: Path, kafka_bootstrap: str, postgres_url: str):
    """Replicas ``a`` and ``b``, started at once (they create the schema side by side)."""
    topics = Topics(f"test-{uuid.uuid4().hex[:8]}.")
    group = "test-analyzer-" + uuid.uuid4().hex[:8]
    pair = [replica(tmp_path, name, kafka_bootstrap, postgres_url, topics, group) for name in ("a", "b")]
    pair[1].tokens = pair[0].tokens  # one token file beside the shared artifact root, made by the first
    for service in pair:
        service.proc.start()
    try:
        for service in pair:
            service.proc.wait_http(service.url + "/healthz", 90)
        yield pair
    finally:
        for service in pair:
            service.proc.terminate()


def jobs_in_store(db_url: str, ids: list[str]) -> dict[str, Job]:
    engine = create_engine(db_url)
    try:
        with Session(engine) as s:
            return {job.id: job for job in s.scalars(select(Job).where(Job.id.in_(ids)))}
    finally:
        engine.dispose()


def metric(service: Analyzer, name: str) -> float:
    """A counter's value on ``service``'s /metrics (0 when the series is absent)."""
    found = re.search(rf"^{name} ([0-9.e+]+)$", service.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_two_replicas_run_each_job_exactly_once(replicas, postgres_url, kafka_bootstrap, digits_checkpoint):
    a, b = replicas
    model = a.upload(digits_checkpoint)
    jobs = [(a, b)[i % 2].submit(model, options={"max_images": 20, "top_k": 1}) for i in range(6)]
    for job in jobs:
        view = b.wait(job, timeout_s=300)
        assert view["status"] == "succeeded", view["error"]
        assert a.get(f"/v1/analyses/{job}").json()["candidates"] == view["candidates"]
    rows = jobs_in_store(postgres_url, jobs)
    assert {job_id: row.attempts for job_id, row in rows.items()} == dict.fromkeys(jobs, 1)
    assert {row.claimed_by for row in rows.values()} == {"a", "b"}  # both did work
    assert "no longer held" not in a.proc.log() + b.proc.log()  # no analysis was cut short
    published = collect(
        kafka_bootstrap, a.topics.candidates, SplitCandidate, lambda c: c.analysis_id in jobs, count=6, linger_s=3
    )
    assert sorted(c.analysis_id for c in published) == sorted(jobs)  # one candidate each, none twice


def test_a_killed_replicas_job_is_taken_over_and_completes_once(
    replicas, postgres_url, kafka_bootstrap, digits_checkpoint
):
    a, b = replicas
    model = a.upload(digits_checkpoint)
    job = a.submit(model, options={"max_images": 1437, "batch_size": 4, "top_k": 3})
    a.wait(job, statuses=("running",))
    holder = jobs_in_store(postgres_url, [job])[job].claimed_by
    victim, survivor = (a, b) if holder == "a" else (b, a)
    victim.proc.kill()  # a crash: the replica and its analysis process die at once
    view = survivor.wait(job, timeout_s=400)
    assert view["status"] == "succeeded", view["error"]
    row = jobs_in_store(postgres_url, [job])[job]
    assert (row.claimed_by, row.attempts) == ("b" if holder == "a" else "a", 2)
    assert metric(survivor, "isplit_analyzer_jobs_taken_over_total") == 1.0
    published = collect(
        kafka_bootstrap, a.topics.candidates, SplitCandidate, lambda c: c.analysis_id == job, count=3, linger_s=3
    )
    ids = [c.candidate_id for c in published]
    assert len(ids) == 3 and len(set(ids)) == 3


def test_a_result_published_twice_is_attached_once(replicas, kafka_bootstrap, digits_checkpoint):
    a, b = replicas
    job = a.submit(a.upload(digits_checkpoint), options={"max_images": 20, "top_k": 2})
    view = a.wait(job)
    assert view["status"] == "succeeded", view["error"]
    first, second = view["candidates"]

    def result(candidate: dict, accuracy: float) -> TrainingResult:
        return TrainingResult(
            analysis_id=job, candidate_id=candidate["candidate_id"], cut=candidate["cut"], status="succeeded",
            accuracy_split=accuracy, bytes_per_image={"fp32": 400}, latency_ms=3.0,
        )  # fmt: skip

    measured = result(first, 0.9)
    stale = measured.model_copy(update={"accuracy_split": 0.1, "created_at": measured.created_at - timedelta(hours=1)})
    for msg in (measured, measured, stale, result(second, 0.8)):  # one partition (key = job): in order
        send(kafka_bootstrap, a.topics.results, job, msg)
    deadline = time.monotonic() + 60
    while not (view := b.get(f"/v1/analyses/{job}").json())["candidates"][1]["measured"]:
        assert time.monotonic() < deadline, a.proc.log() + b.proc.log()
        time.sleep(0.5)
    assert [c["measured"]["accuracy_split"] for c in view["candidates"]] == [0.9, 0.8]
    assert view["correlation"]["measured"] == 2
    consumed = sum(metric(s, "isplit_analyzer_results_consumed_total") for s in (a, b))
    duplicates = sum(metric(s, "isplit_analyzer_results_duplicate_total") for s in (a, b))
    assert (consumed, duplicates) == (2.0, 2.0)


def test_a_job_cancelled_through_the_other_replica_stops_where_it_runs(replicas, postgres_url, digits_checkpoint):
    a, b = replicas
    job = a.submit(a.upload(digits_checkpoint), options={"max_images": 1437, "batch_size": 4, "top_k": 0})
    a.wait(job, statuses=("running",))
    runner, other = (a, b) if jobs_in_store(postgres_url, [job])[job].claimed_by == "a" else (b, a)
    # The row says running once claimed; the process starts a moment later (from the forkserver).
    started = time.monotonic() + 60
    while metric(runner, "isplit_analyzer_jobs_in_progress") != 1.0:
        assert time.monotonic() < started, runner.proc.log()
        time.sleep(0.2)
    r = other.delete(f"/v1/analyses/{job}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    deadline = time.monotonic() + 3 * LEASE_SECONDS  # the runner's next lease renewal notices
    while metric(runner, "isplit_analyzer_jobs_in_progress") != 0.0:
        assert time.monotonic() < deadline, runner.proc.log()
        time.sleep(0.5)
    assert "no longer held" in runner.proc.log()
    assert runner.get(f"/v1/analyses/{job}").json()["status"] == "cancelled"
