"""HTTP request and response bodies (kept apart from the storage models)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AnalysisOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_images: int = Field(default=1000, ge=1, le=200_000, description="images analysed (stratified slice)")
    batch_size: int = Field(default=64, ge=1, le=4096)
    target: Literal["label", "predicted"] = "label"
    top_k: int = Field(default=3, ge=0, le=64, description="candidates published to the trainer")
    compression_ratio: int = Field(default=4, ge=1, le=256)
    epochs: int = Field(default=2, ge=1, le=1000, description="bottleneck training epochs")
    lr: float = Field(default=5e-3, gt=0, le=10)
    train_batch_size: int = Field(default=64, ge=1, le=4096)
    finetune_tail: bool = False
    max_train_images: int | None = Field(default=None, ge=1)
    max_test_images: int | None = Field(default=None, ge=1)


class AnalysisRequest(BaseModel):
    """Submit an analysis of an uploaded model (``POST /v1/models`` gives the ``model_id``)."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(pattern=r"^m-[0-9a-f]{12}$", description="from POST /v1/models")
    arch: str | None = Field(default=None, description="if given, must match the uploaded checkpoint")
    dataset: str = Field(min_length=1, max_length=512, description="fashion-mnist | digits | imagefolder:<path>")
    classes: list[int | str] | None = Field(default=None, description="class indices or names; null = all")
    options: AnalysisOptions = Field(default_factory=AnalysisOptions)


class Accepted(BaseModel):
    id: str
    status: str
    status_url: str


class Progress(BaseModel):
    images_done: int
    images_total: int
    fraction: float


class CandidateView(BaseModel):
    candidate_id: str
    cut: str
    predicted_rank: int
    size_rank: int
    cui: float
    log10_cui: float
    output_bytes: int
    published: bool
    measured: dict[str, Any] | None = None


class Correlation(BaseModel):
    measured: int = Field(description="candidates with a measured accuracy")
    spearman_cui: float | None = Field(description="Spearman of measured accuracy vs CUI")
    spearman_size: float | None = Field(description="Spearman of measured accuracy vs smaller output size")


class AnalysisView(BaseModel):
    id: str
    status: Literal["queued", "running", "analysed", "succeeded", "failed", "cancelled"]
    progress: Progress
    request: dict[str, Any]
    error: str | None
    created_at: datetime
    updated_at: datetime
    result: dict[str, Any] | None = None
    candidates: list[CandidateView] = []
    correlation: Correlation | None = None
    plot_url: str | None = None


class AnalysisPage(BaseModel):
    items: list[AnalysisView]
    total: int
    limit: int
    offset: int


class ModelView(BaseModel):
    model_id: str
    arch: str
    sha256: str
    size_bytes: int
    num_classes: int
    in_channels: int
    input_size: int
    class_names: list[str]
    test_accuracy: float | None
