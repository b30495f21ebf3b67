"""The analyzer's settings: environment variables, each with a default that works locally."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field

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

    def db_url(self) -> str:
        """The job store's SQLAlchemy URL (the SQLite file's directory is made at start-up)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.artifact_root / 'analyzer.sqlite').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
