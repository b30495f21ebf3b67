"""The analyzer's settings: environment variables, each with a default that works locally."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from isplit.settings import ServiceSettings


class Settings(ServiceSettings):
    """Read from ``ISPLIT_*`` variables (``DATABASE_URL`` as is)."""

    data_root: Path = Field(default=Path("var/data"), description="image folders must live under it")
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("DATABASE_URL", "ISPLIT_DATABASE_URL"),
        description="SQLAlchemy URL; empty = SQLite file under the artifact root",
    )
    analyzer_host: str = "127.0.0.1"
    analyzer_port: int = 8000
    analyzer_workers: int = Field(default=1, ge=1, le=16, description="analyses run at once")
    analyzer_device: str = "auto"
    analyzer_executor: Literal["inline", "kubernetes"] = Field(
        default="inline", description="inline: child processes here; kubernetes: one Indexed Job per analysis"
    )
    analyzer_shards: int = Field(default=2, ge=1, le=64, description="kubernetes executor: shards (pods) per analysis")
    analyzer_job_template: str = Field(
        default="", description="kubernetes executor: the Job template JSON (isplit_analyzer.executors)"
    )
    max_upload_bytes: int = 200 * 1024 * 1024
    publish_retry_seconds: float = 5.0
    results_group: str = "isplit-analyzer"

    @model_validator(mode="after")
    def _kubernetes_needs_a_template(self) -> Settings:
        if self.analyzer_executor == "kubernetes" and not self.analyzer_job_template:
            raise ValueError(
                "ISPLIT_ANALYZER_EXECUTOR=kubernetes needs ISPLIT_ANALYZER_JOB_TEMPLATE (the chart renders it)"
            )
        return self

    def db_url(self) -> str:
        """The job store's SQLAlchemy URL (the SQLite file's directory is made at start-up)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.artifact_root / 'analyzer.sqlite').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
