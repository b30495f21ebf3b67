"""The analyzer's job store on SQLite and on a real PostgreSQL server: claims, leases,
takeovers, results attached once, and the schema upgrade of an existing database."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, func, inspect, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from isplit.messages import TrainingResult
from isplit_analyzer.config import Settings
from isplit_analyzer.results import ATTACHED, DUPLICATE, UNKNOWN, attach_result
from isplit_analyzer.store import (
    ANALYSED,
    QUEUED,
    RUNNING,
    CandidateRow,
    Job,
    claim_next_job,
    claim_publishing,
    held,
    make_engine,
    release_claims,
    renew_leases,
    session_factory,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
LEASE = 30.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sessions(store_url: str) -> sessionmaker[Session]:
    return session_factory(make_engine(store_url))


def add_jobs(sessions: sessionmaker[Session], n: int, status: str = QUEUED) -> list[str]:
    ids = [f"a-{i:012d}" for i in range(n)]
    with sessions.begin() as s:
        s.add_all(
            Job(id=job_id, status=status, request={}, created_at=T0 + timedelta(seconds=i))
            for i, job_id in enumerate(ids)
        )
    return ids


def sessions_of(url: str) -> sessionmaker[Session]:
    return session_factory(make_engine(url))


def after(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_concurrent_replicas_claim_each_queued_job_exactly_once(store_url: str):
    ids = add_jobs(sessions_of(store_url), 40)
    claims: list = []
    errors: list[BaseException] = []

    def replica(name: str) -> None:
        sessions = sessions_of(store_url)  # its own connections, like a process
        try:
            while True:
                with sessions.begin() as s:
                    claim = claim_next_job(s, name, LEASE, now=after(100))
                    left = s.scalar(select(func.count()).select_from(Job).where(Job.status == QUEUED))
                if claim is not None:
                    claims.append(claim)
                elif not left:
                    return
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(c.job_id for c in claims) == ids
    assert {c.attempt for c in claims} == {1}
    assert len({c.replica for c in claims}) > 1
    with sessions_of(store_url).begin() as s:
        rows = s.execute(select(Job.id, Job.status, Job.claimed_by)).all()
    assert {(c.job_id, c.replica) for c in claims} == {(r.id, r.claimed_by) for r in rows}
    assert {r.status for r in rows} == {RUNNING}


def test_oldest_queued_job_is_claimed_first(sessions):
    ids = add_jobs(sessions, 3)
    with sessions.begin() as s:
        assert claim_next_job(s, "a", LEASE, now=after(10)).job_id == ids[0]  # type: ignore[union-attr]
        assert claim_next_job(s, "a", LEASE, now=after(10)).job_id == ids[1]  # type: ignore[union-attr]


def test_a_live_lease_is_not_taken_over(sessions):
    add_jobs(sessions, 1)
    with sessions.begin() as s:
        assert claim_next_job(s, "a", LEASE, now=after(0)) is not None
    with sessions.begin() as s:
        assert claim_next_job(s, "b", LEASE, now=after(LEASE - 1)) is None


def test_a_lapsed_lease_is_taken_over_and_fences_its_old_holder(sessions):
    (job_id,) = add_jobs(sessions, 1)
    with sessions.begin() as s:
        first = claim_next_job(s, "a", LEASE, now=after(0))
    with sessions.begin() as s:
        second = claim_next_job(s, "b", LEASE, now=after(LEASE + 1))
    assert first is not None and second is not None
    assert (second.job_id, second.attempt, second.taken_over_from) == (job_id, 2, "a")
    with sessions.begin() as s:
        # The old holder's writes change nothing, and its next renewal reports the job lost.
        assert s.execute(update(Job).where(held(first)).values(images_done=5)).rowcount == 0
        assert renew_leases(s, "a", {job_id: first.attempt}, LEASE, now=after(LEASE + 2)) == {job_id}
        assert renew_leases(s, "b", {job_id: second.attempt}, LEASE, now=after(LEASE + 2)) == set()
        assert s.execute(update(Job).where(held(second)).values(images_done=5)).rowcount == 1


def test_renewing_a_lease_keeps_the_job(sessions):
    (job_id,) = add_jobs(sessions, 1)
    with sessions.begin() as s:
        claim = claim_next_job(s, "a", LEASE, now=after(0))
        assert claim is not None
        assert renew_leases(s, "a", {job_id: claim.attempt}, LEASE, now=after(LEASE - 5)) == set()
    with sessions.begin() as s:
        assert claim_next_job(s, "b", LEASE, now=after(LEASE + 5)) is None
        assert claim_next_job(s, "b", LEASE, now=after(2 * LEASE)) is not None


def test_a_cancelled_job_is_reported_lost_to_its_holder(sessions):
    (job_id,) = add_jobs(sessions, 1)
    with sessions.begin() as s:
        claim = claim_next_job(s, "a", LEASE, now=after(0))
        s.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
    with sessions.begin() as s:
        assert renew_leases(s, "a", {job_id: claim.attempt}, LEASE, now=after(1)) == {job_id}  # type: ignore[union-attr]


def test_a_job_its_own_analysis_finished_is_still_held(sessions):
    (job_id,) = add_jobs(sessions, 1)
    with sessions.begin() as s:
        claim = claim_next_job(s, "a", LEASE, now=after(0))
        assert claim is not None
        s.execute(update(Job).where(held(claim)).values(status=ANALYSED))  # as the analysis process does
    with sessions.begin() as s:
        assert renew_leases(s, "a", {job_id: claim.attempt}, LEASE, now=after(1)) == set()
        assert renew_leases(s, "a", {job_id: claim.attempt - 1}, LEASE, now=after(1)) == {job_id}  # an older claim


def test_analysed_jobs_are_published_by_one_replica_until_its_lease_lapses(sessions):
    (job_id,) = add_jobs(sessions, 1, status=ANALYSED)  # e.g. left by a release, lease empty
    with sessions.begin() as s:
        assert claim_publishing(s, "a", LEASE, now=after(0)) == [job_id]
    with sessions.begin() as s:
        assert claim_publishing(s, "b", LEASE, now=after(1)) == []
        assert claim_publishing(s, "a", LEASE, now=after(1)) == [job_id]
    with sessions.begin() as s:
        assert claim_publishing(s, "b", LEASE, now=after(LEASE + 1)) == [job_id]
        assert claim_publishing(s, "a", LEASE, now=after(LEASE + 1)) == []


def test_release_gives_running_jobs_back_to_the_queue_and_analysed_ones_to_anyone(sessions):
    running, analysed = add_jobs(sessions, 2)
    with sessions.begin() as s:
        claim_next_job(s, "a", LEASE, now=after(0))
        s.execute(update(Job).where(Job.id == analysed).values(status=ANALYSED, claimed_by="a", lease_until=after(99)))
        s.execute(update(Job).where(Job.id == running).values(images_done=7))
    with sessions.begin() as s:
        assert release_claims(s, "b") == 0
        assert release_claims(s, "a") == 2
    with sessions.begin() as s:
        job = s.get(Job, running)
        assert (job.status, job.claimed_by, job.images_done) == (QUEUED, None, 0)  # type: ignore[union-attr]
        assert claim_publishing(s, "b", LEASE, now=after(1)) == [analysed]


def result(candidate_id: str, at: datetime, accuracy: float) -> TrainingResult:
    return TrainingResult(
        analysis_id="a-000000000000",
        candidate_id=candidate_id,
        cut="features.3",
        status="succeeded",
        accuracy_split=accuracy,
        created_at=at,
    )


def test_a_result_attaches_once_and_the_newest_wins(sessions):
    (job_id,) = add_jobs(sessions, 1, status="succeeded")
    cand = f"{job_id}-c1"
    with sessions.begin() as s:
        s.add(CandidateRow(candidate_id=cand, analysis_id=job_id, cut="features.3", predicted_rank=1, size_rank=1,
                           cui=1.0, log10_cui=0.0, output_bytes=1, message="{}", published=True))  # fmt: skip
    first = result(cand, after(10), 0.8)
    assert attach_result(sessions, first) == ATTACHED
    assert attach_result(sessions, first) == DUPLICATE  # re-delivered or re-published
    assert attach_result(sessions, result(cand, after(5), 0.1)) == DUPLICATE  # an older one, late
    with sessions() as s:
        assert s.get(CandidateRow, cand).result["accuracy_split"] == 0.8  # type: ignore[index,union-attr]
    assert attach_result(sessions, result(cand, after(20), 0.9)) == ATTACHED  # retrained
    with sessions() as s:
        assert s.get(CandidateRow, cand).result["accuracy_split"] == 0.9  # type: ignore[index,union-attr]
    assert attach_result(sessions, result("a-000000000000-nope", after(30), 0.5)) == UNKNOWN


OLD_SCHEMA = [  # the job tables as the release before claims created them
    "CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, status VARCHAR(16), request JSON, images_done INTEGER, "
    "images_total INTEGER, error TEXT, attempts INTEGER, seconds FLOAT, images_per_second FLOAT, "
    "created_at TIMESTAMP, updated_at TIMESTAMP)",
    "CREATE TABLE candidates (candidate_id VARCHAR(160) PRIMARY KEY, analysis_id VARCHAR(32) REFERENCES jobs(id), "
    "cut VARCHAR(128), predicted_rank INTEGER, size_rank INTEGER, cui FLOAT, log10_cui FLOAT, "
    "output_bytes INTEGER, message TEXT, published BOOLEAN, result JSON)",
    "INSERT INTO jobs VALUES ('a-000000000001', 'queued', '{}', 0, 20, NULL, 0, NULL, NULL, "
    "'2026-01-01 00:00:00', '2026-01-01 00:00:00')",
]


def test_an_existing_database_gets_the_new_columns_and_keeps_its_jobs(store_url):
    with create_engine(store_url).begin() as conn:
        for statement in OLD_SCHEMA:
            conn.execute(text(statement))
    engine = make_engine(store_url)
    columns = {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert {"claimed_by", "lease_until"} <= columns
    assert "result_created_at" in {c["name"] for c in inspect(engine).get_columns("candidates")}
    with session_factory(engine).begin() as s:
        claim = claim_next_job(s, "a", LEASE)
    assert claim is not None and claim.job_id == "a-000000000001"


def test_replicas_starting_at_once_create_the_schema_once(postgres_url):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            make_engine(postgres_url)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("", "sqlite:///"),
        ("sqlite:////var/lib/isplit/analyzer.db", "sqlite:////var/lib/isplit/analyzer.db"),
        ("postgresql+psycopg://u:p@db:5432/isplit", "postgresql+psycopg://u:p@db:5432/isplit"),
        ("postgresql://u:p@db/isplit", "postgresql+psycopg://u:p@db/isplit"),
        ("postgres://u:p@db/isplit", "postgresql+psycopg://u:p@db/isplit"),
    ],
)
def test_database_urls_get_the_installed_driver(given, used, tmp_path):
    settings = Settings(database_url=given, artifact_root=tmp_path)
    assert settings.db_url().startswith(used)


def test_an_unsupported_database_is_refused_by_name():
    with pytest.raises(ValidationError, match="'mysql' is not supported"):
        Settings(database_url="mysql://u:p@db/isplit")


def test_a_nul_in_an_id_finds_nothing_and_a_nul_in_a_message_is_stored(sessions):
    """PostgreSQL text cannot hold NUL; a client's NUL must give a 404, not a DataError (500)."""
    (job_id,) = add_jobs(sessions, 1)
    with sessions.begin() as s:
        assert s.get(Job, "a-\x00") is None
        assert s.scalars(select(Job).where(Job.id.in_(["a-\x00", job_id]))).one().id == job_id
        s.execute(update(Job).where(Job.id == job_id).values(error="unknown class 'x\x00y'"))
    with sessions() as s:
        assert s.get(Job, job_id).error.startswith("unknown class 'x")  # type: ignore[union-attr]
