"""Service configuration: one pydantic-settings base every isplit service extends.

Each service reads ``ISPLIT_*`` environment variables through one ``Settings`` class derived
from :class:`ServiceSettings`; every setting has a default that works on one machine. The base
holds what every service shares: the Kafka broker, the artifact root and the topic namespace.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from isplit.bus import KafkaSecurity, Topics


class ServiceSettings(BaseSettings):
    """Settings common to every service, read from ``ISPLIT_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="ISPLIT_", extra="ignore")

    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap address, host:port")
    artifact_root: Path = Field(default=Path("var/artifacts"), description="weights, reports, heads, tails")
    topic_prefix: str = Field(default="", description="namespace for the Kafka topics (shared clusters, tests)")
    data_root: Path = Field(default=Path("var/data"), description="image folders must live under it")
    consumer_stall_s: float = Field(
        default=60.0, gt=0, description="/readyz fails when a consumer with lag made no progress this long, seconds"
    )

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> ServiceSettings:
        try:  # fail at start-up, naming the variables, not at the first Kafka call
            KafkaSecurity()
        except ValidationError as exc:  # its message only: the input holds the password
            raise ValueError("; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in exc.errors())) from None
        return self

    def topics(self) -> Topics:
        """The contract topics under this installation's prefix."""
        return Topics(self.topic_prefix)
