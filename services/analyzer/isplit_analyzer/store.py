"""Job state in a SQL database through SQLAlchemy (SQLite by default, PostgreSQL works)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
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
    size_bytes: Mapped[int] = mapped_column(Integer)
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


class CandidateRow(Base):
    __tablename__ = "candidates"
    candidate_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    analysis_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    cut: Mapped[str] = mapped_column(String(128))
    predicted_rank: Mapped[int] = mapped_column(Integer)
    size_rank: Mapped[int] = mapped_column(Integer)
    cui: Mapped[float] = mapped_column(Float)
    log10_cui: Mapped[float] = mapped_column(Float)
    output_bytes: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)  # the SplitCandidate JSON, published as is
    published: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # TrainingResult


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL and a busy timeout so analysis processes can write too."""
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
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    return engine


def add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns a store made by an older version lacks (``owner``): rows from
    before authentication have no owner, and only ``admin`` tokens see them."""
    tables = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in tables.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    kind = column.type.compile(engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def candidate_rows(session: Session, analysis_id: str) -> list[CandidateRow]:
    """The candidates of one analysis, best predicted rank first."""
    query = select(CandidateRow).where(CandidateRow.analysis_id == analysis_id).order_by(CandidateRow.predicted_rank)
    return list(session.scalars(query))
