"""The trainer's settings: environment variables, each with a default that works locally."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from isplit.settings import ServiceSettings
from isplit.torchserve import TailBatching, TorchServeKeys, read_keys, tail_batching


class Settings(ServiceSettings):
    """Read from ``ISPLIT_*`` variables."""

    torchserve_management_url: str = Field(default="http://127.0.0.1:8081", description="empty = do not register")
    torchserve_inference_url: str = "http://127.0.0.1:8080"
    torchserve_model_store: Path | None = Field(default=None, description="default: <artifact_root>/model-store")
    torchserve_key_file: Path = Field(
        default=Path("var/torchserve/key_file.json"),
        description="TorchServe's key_file.json (token authorization), read at each registration",
    )
    torchserve_management_key: SecretStr = Field(
        default=SecretStr(""), description="the management key (a Secret in a cluster); set, it wins over the file"
    )
    torchserve_inference_key: SecretStr = Field(
        default=SecretStr(""), description="the inference key for the trainer's test requests; set, it wins"
    )
    trainer_metrics_port: int = 9101
    trainer_executor: Literal["inline", "kubernetes"] = "inline"
    trainer_device: str = "auto"
    trainer_group: str = "isplit-trainer"
    trainer_id: str = Field(default_factory=socket.gethostname)
    trainer_max_train_images: int | None = Field(default=None, description="cap when the candidate sets none")
    # Unset (the default), each is chosen from the tail's measured cost (isplit.torchserve.tail_batching).
    tail_batch_size: int | None = Field(default=None, ge=1, le=1024, description="unset: 16")
    tail_max_batch_delay_ms: int | None = Field(
        default=None, ge=0, le=10_000, description="unset: 0 for a tail under 1 ms per image, else 1-5 ms by its cost"
    )
    tail_workers: int | None = Field(default=None, ge=1, le=64, description="unset: 2")
    trainer_job_template: str = Field(
        default="", description="kubernetes executor: the Job template JSON (see k8s_executor.JobTemplate)"
    )

    def torchserve_keys(self) -> TorchServeKeys:
        """The keys for TorchServe: the configured ones, else those in the key file (read now:
        a restarted TorchServe has new ones); empty without either (token authorization off, as
        in the chart). Raises ``IsplitError`` when the key file exists but cannot be read."""
        management = self.torchserve_management_key.get_secret_value()
        inference = self.torchserve_inference_key.get_secret_value()
        if (management and inference) or not self.torchserve_key_file.exists():
            return TorchServeKeys(management=management, inference=inference)
        from_file = read_keys(self.torchserve_key_file)
        return TorchServeKeys(management=management or from_file.management, inference=inference or from_file.inference)

    def tail_batching(self, tail_ms_per_image: float) -> TailBatching:
        """How to register a tail costing ``tail_ms_per_image`` (ms): the rule's choice, except
        for each ``tail_*`` setting that is set."""
        rule = tail_batching(tail_ms_per_image)
        return TailBatching(
            batch_size=rule.batch_size if self.tail_batch_size is None else self.tail_batch_size,
            max_batch_delay_ms=rule.max_batch_delay_ms
            if self.tail_max_batch_delay_ms is None
            else self.tail_max_batch_delay_ms,
            workers=rule.workers if self.tail_workers is None else self.tail_workers,
        )

    def model_store(self) -> Path:
        return self.torchserve_model_store or self.artifact_root / "model-store"


@lru_cache
def get_settings() -> Settings:
    return Settings()
