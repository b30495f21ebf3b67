"""The trainer's settings: environment variables, each with a default that works locally."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field

from isplit.settings import ServiceSettings


class Settings(ServiceSettings):
    """Read from ``ISPLIT_*`` variables."""

    torchserve_management_url: str = Field(default="http://127.0.0.1:8081", description="empty = do not register")
    torchserve_inference_url: str = "http://127.0.0.1:8080"
    torchserve_model_store: Path | None = Field(default=None, description="default: <artifact_root>/model-store")
    trainer_metrics_port: int = 9101
    trainer_executor: Literal["inline", "kubernetes"] = "inline"
    trainer_device: str = "auto"
    trainer_group: str = "isplit-trainer"
    trainer_id: str = Field(default_factory=socket.gethostname)
    trainer_max_train_images: int | None = Field(default=None, description="cap when the candidate sets none")
    tail_batch_size: int = 16
    tail_max_batch_delay_ms: int = Field(default=0, description="0: lowest latency; 1 ms: larger batches under load")
    tail_workers: int = 2
    trainer_job_template: str = Field(
        default="", description="kubernetes executor: the Job template JSON (see k8s_executor.JobTemplate)"
    )

    def model_store(self) -> Path:
        return self.torchserve_model_store or self.artifact_root / "model-store"


@lru_cache
def get_settings() -> Settings:
    return Settings()
