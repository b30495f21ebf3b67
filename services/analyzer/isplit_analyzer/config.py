"""The analyzer's settings: environment variables, each with a default that works locally."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from isplit.bus import Topics


class Settings(BaseSettings):
    """Read from ``ISPLIT_*`` variables (``DATABASE_URL`` as is)."""

    model_config = SettingsConfigDict(env_prefix="ISPLIT_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    artifact_root: Path = Path("var/artifacts")
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
    max_upload_bytes: int = 200 * 1024 * 1024
    publish_retry_seconds: float = 5.0
    results_group: str = "isplit-analyzer"
    topic_prefix: str = Field(default="", description="namespace for the Kafka topics (shared clusters, tests)")

    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.artifact_root / 'analyzer.sqlite').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
