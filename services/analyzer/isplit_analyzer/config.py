"""The analyzer's settings: environment variables, each with a default that works locally."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from isplit.settings import ServiceSettings


class Settings(ServiceSettings):
    """Read from ``ISPLIT_*`` variables (``DATABASE_URL`` as is)."""

    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("ISPLIT_ANALYZER_DB_URL", "DATABASE_URL", "ISPLIT_DATABASE_URL"),
        description="job store: sqlite:///<file> or postgresql+psycopg://user:password@host:port/db; "
        "empty = SQLite file under the artifact root. Several replicas need PostgreSQL",
    )
    analyzer_replica_id: str = Field(
        default="", max_length=128, description="this replica's name in job claims; empty = <hostname>-<pid>"
    )
    analyzer_lease_seconds: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="a replica holds a claimed job this long and renews it every third of it; "
        "when it lapses (the replica died) another replica takes the job over",
    )
    analyzer_host: str = "127.0.0.1"
    analyzer_port: int = 8000
    analyzer_workers: int = Field(default=1, ge=1, le=16, description="analyses run at once")
    analyzer_worker_memory_mb: int = Field(
        default=0, ge=0, description="memory limit of each analysis process (RLIMIT_DATA), MiB; 0 = none"
    )
    analyzer_device: str = "auto"
    analyzer_executor: Literal["inline", "kubernetes"] = Field(
        default="inline", description="inline: child processes here; kubernetes: one Indexed Job per analysis"
    )
    analyzer_shards: int = Field(default=2, ge=1, le=64, description="kubernetes executor: shards (pods) per analysis")
    analyzer_job_template: str = Field(
        default="", description="kubernetes executor: the Job template JSON (isplit_analyzer.executors)"
    )
    max_upload_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1, description="POST /v1/models body limit (file and multipart framing)"
    )
    max_request_bytes: int = Field(default=1024 * 1024, ge=1, description="body limit of every other request")
    analyzer_tokens_file: Path = Field(
        default=Path("var/run/analyzer-tokens.jsonl"),
        description="API tokens (JSON lines: name, sha256, scopes); missing = every API call is 401",
    )
    header_timeout_seconds: float = Field(default=10.0, gt=0, description="a request's headers must arrive in it")
    body_idle_timeout_seconds: float = Field(default=15.0, gt=0, description="longest pause between body chunks")
    body_timeout_seconds: float = Field(default=300.0, gt=0, description="a whole request body must arrive in it")
    publish_retry_seconds: float = 5.0
    results_group: str = "isplit-analyzer"

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        scheme = url.split("://", 1)[0]
        if url and scheme not in DB_DRIVERS:
            raise ValueError(f"database URL scheme {scheme!r} is not supported; use {' or '.join(DB_SCHEMES)}")
        return url

    @model_validator(mode="after")
    def _kubernetes_needs_a_template(self) -> Settings:
        if self.analyzer_executor == "kubernetes" and not self.analyzer_job_template:
            raise ValueError(
                "ISPLIT_ANALYZER_EXECUTOR=kubernetes needs ISPLIT_ANALYZER_JOB_TEMPLATE (the chart renders it)"
            )
        return self

    def db_url(self) -> str:
        """The job store's SQLAlchemy URL (the SQLite file's directory is made at start-up);
        ``postgres://`` and ``postgresql://`` URLs get the installed driver, psycopg 3."""
        if not self.database_url:
            return f"sqlite:///{(self.artifact_root / 'analyzer.sqlite').resolve()}"
        scheme, rest = self.database_url.split("://", 1)
        return f"{DB_DRIVERS[scheme]}://{rest}"

    def replica_id(self) -> str:
        """This process's name in job claims: unique among the live replicas."""
        return self.analyzer_replica_id or f"{socket.gethostname()}-{os.getpid()}"


DB_SCHEMES = ("sqlite:///<file>", "postgresql+psycopg://user:password@host:port/database")
DB_DRIVERS = {
    "sqlite": "sqlite",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
}


@lru_cache
def get_settings() -> Settings:
    return Settings()
