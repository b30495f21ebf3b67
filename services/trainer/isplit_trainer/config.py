"""The trainer's settings: environment variables, each with a default that works locally."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from isplit.settings import ServiceSettings
from isplit.torchserve import TorchServeKeys, read_keys


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
    tail_batch_size: int = 16
    tail_max_batch_delay_ms: int = Field(default=0, description="0: lowest latency; 1 ms: larger batches under load")
    tail_workers: int = 2
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

    def model_store(self) -> Path:
        return self.torchserve_model_store or self.artifact_root / "model-store"


@lru_cache
def get_settings() -> Settings:
    return Settings()
