"""Job state in a SQL database through SQLAlchemy: SQLite by default, PostgreSQL for several
analyzer replicas.

Replicas share the job table through claims: a replica claims a queued job (or one whose
lease expired: its replica died) atomically, holds it under a lease it renews while it works,
and every write it makes about the job is fenced by the claim, so a replica that lost its
claim can no longer change the job. See ``claim_next_job``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    and_,
    create_engine,
    event,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

QUEUED, RUNNING, ANALYSED, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "analysed",  # curve computed, candidates not all published yet (retryable)
    "succeeded",
    "failed",
    "cancelled",
)
FINAL = {SUCCEEDED, FAILED, CANCELLED}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ModelRecord(Base):
    """An uploaded checkpoint, stored at ``models/<id>.pt`` under the artifact root."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    arch: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)  # token principal
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=QUEUED)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)  # token principal
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    images_total: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # The replica that runs the job (or publishes its candidates) and until when it holds it.
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CandidateRow(Base):
    __tablename__ = "candidates"
    candidate_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    analysis_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    cut: Mapped[str] = mapped_column(String(128))
    predicted_rank: Mapped[int] = mapped_column(Integer)
    size_rank: Mapped[int] = mapped_column(Integer)
    cui: Mapped[float] = mapped_column(Float)
    log10_cui: Mapped[float] = mapped_column(Float)
    output_bytes: Mapped[int] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(Text)  # the SplitCandidate JSON, published as is
    published: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # TrainingResult
    result_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL and a busy timeout so analysis processes can write too;
    PostgreSQL gets strings without NUL characters (see ``_without_nul``)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    else:
        engine = create_engine(url, pool_pre_ping=True)
        event.listen(engine, "before_cursor_execute", _without_nul, retval=True)
    with engine.begin() as conn:
        migrate(conn)
    return engine


def _without_nul(
    _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
) -> tuple[str, Any]:
    """PostgreSQL text cannot hold NUL (a DataError, a 500). No id, name or message the store
    keeps has one, so a NUL a client sent becomes U+FFFD: a lookup finds nothing (404), a
    message is stored legibly. JSON values arrive serialised, their NULs escaped."""

    def clean(value: Any) -> Any:
        return value.replace("\x00", "\ufffd") if isinstance(value, str) else value

    def clean_all(params: Any) -> Any:
        if isinstance(params, dict):
            return {key: clean(value) for key, value in params.items()}
        if isinstance(params, (list, tuple)):
            return type(params)(clean(value) for value in params)
        return params

    return statement, [clean_all(p) for p in parameters] if executemany else clean_all(parameters)


# Any constant: replicas starting at once on PostgreSQL take turns creating the schema.
SCHEMA_LOCK_KEY = 0x15911700


def migrate(conn: Connection) -> None:
    """Create missing tables and add columns a newer release declares (nullable ones, or ones
    with a constant default), so an existing database keeps its jobs across an upgrade."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
    Base.metadata.create_all(conn)
    quote = conn.dialect.identifier_preparer.quote
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl = f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {column.type.compile(conn.dialect)}"
            if not column.nullable:
                default = column.default.arg if column.default is not None and column.default.is_scalar else None
                if default is None:
                    raise RuntimeError(
                        f"cannot add NOT NULL column {table.name}.{column.name} without a constant default"
                    )
                value = literal(default, column.type).compile(conn.dialect, compile_kwargs={"literal_binds": True})
                ddl += f" DEFAULT {value} NOT NULL"
            conn.execute(text(ddl))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def candidate_rows(session: Session, analysis_id: str) -> list[CandidateRow]:
    """The candidates of one analysis, best predicted rank first."""
    query = select(CandidateRow).where(CandidateRow.analysis_id == analysis_id).order_by(CandidateRow.predicted_rank)
    return list(session.scalars(query))


# -- claims: which replica runs a job ---------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A replica's hold on a job. ``attempt`` (the job's claim count) fences the hold: a
    replica whose job was taken over, cancelled or failed no longer matches ``held``."""

    job_id: str
    replica: str
    attempt: int
    taken_over_from: str | None = None  # the replica whose lease had expired


def held(claim: Claim) -> ColumnElement[bool]:
    """The WHERE clause of every write the claim's holder makes while the job runs."""
    return and_(
        Job.id == claim.job_id,
        Job.status == RUNNING,
        Job.claimed_by == claim.replica,
        Job.attempts == claim.attempt,
    )


def claim_next_job(session: Session, replica: str, lease_s: float, now: datetime | None = None) -> Claim | None:
    """Claim the oldest queued job, or a running one whose lease expired (its replica died),
    for ``replica`` until ``now + lease_s``: status ``running``, attempts + 1. None when there
    is none, or another replica won the race.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets replicas claim side by side without waiting;
    the guarded UPDATE makes the claim atomic on any database (SQLite serialises writers).
    """
    now = now or utcnow()
    claimable = or_(Job.status == QUEUED, and_(Job.status == RUNNING, Job.lease_until < now))
    candidate = session.execute(
        select(Job.id, Job.status, Job.claimed_by)
        .where(claimable)
        .order_by(Job.created_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if candidate is None:
        return None
    attempt = session.scalar(
        update(Job)
        .where(Job.id == candidate.id, claimable)
        .values(
            status=RUNNING,
            claimed_by=replica,
            lease_until=now + timedelta(seconds=lease_s),
            attempts=Job.attempts + 1,
            images_done=0,
            error=None,
        )
        .returning(Job.attempts)
    )
    if attempt is None:
        return None
    previous = candidate.claimed_by if candidate.status == RUNNING else None
    return Claim(candidate.id, replica, attempt, previous)


def claim_publishing(session: Session, replica: str, lease_s: float, now: datetime | None = None) -> list[str]:
    """Take the analysed jobs nobody holds (their replica stopped, or its lease expired), and
    return every analysed job ``replica`` holds, oldest first: it publishes their candidates."""
    now = now or utcnow()
    orphaned = or_(Job.lease_until.is_(None), Job.lease_until < now)
    ids = session.scalars(
        select(Job.id).where(Job.status == ANALYSED, orphaned).with_for_update(skip_locked=True)
    ).all()
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == ANALYSED, orphaned)
            .values(claimed_by=replica, lease_until=now + timedelta(seconds=lease_s), updated_at=Job.updated_at)
        )
    return list(
        session.scalars(
            select(Job.id).where(Job.status == ANALYSED, Job.claimed_by == replica).order_by(Job.created_at)
        )
    )


def renew_leases(
    session: Session, replica: str, running: Mapping[str, int], lease_s: float, now: datetime | None = None
) -> set[str]:
    """Extend ``replica``'s leases by ``lease_s`` from ``now``: the jobs it runs (``running``:
    job id -> attempt) and the analysed jobs it publishes. Returns the ids in ``running`` it no
    longer holds (taken over, given back, cancelled): their analyses must stop. A job its own
    analysis just finished (analysed, failed) is still held: the runner reaps it."""
    until = (now or utcnow()) + timedelta(seconds=lease_s)
    session.execute(
        update(Job)
        .where(
            Job.claimed_by == replica,
            or_(Job.status == ANALYSED, and_(Job.status == RUNNING, Job.id.in_(list(running)))),
        )
        .values(lease_until=until, updated_at=Job.updated_at)
    )
    rows = session.execute(
        select(Job.id, Job.attempts).where(
            Job.id.in_(list(running)), Job.claimed_by == replica, Job.status.not_in((QUEUED, CANCELLED))
        )
    )
    still = {job_id for job_id, attempt in rows if running[job_id] == attempt}
    return set(running) - still


def release_claims(session: Session, replica: str) -> int:
    """Give back every job ``replica`` holds: running ones to the queue, analysed ones to any
    replica to publish. At shutdown so others need not wait for the leases; at start-up for a
    predecessor with the same replica id (a restarted container) that died holding them.
    Returns the number of jobs released."""
    requeued = session.execute(
        update(Job)
        .where(Job.status == RUNNING, Job.claimed_by == replica)
        .values(status=QUEUED, claimed_by=None, lease_until=None, images_done=0, error=None)
    ).rowcount
    unleased = session.execute(
        update(Job)
        .where(Job.status == ANALYSED, Job.claimed_by == replica)
        .values(claimed_by=None, lease_until=None, updated_at=Job.updated_at)
    ).rowcount
    return requeued + unleased
