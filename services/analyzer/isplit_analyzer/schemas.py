"""HTTP request and response bodies (kept apart from the storage models)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from isplit.messages import BottleneckSpec
from isplit.plan import DeploymentSpec

Status = Literal["queued", "running", "analysed", "succeeded", "failed", "cancelled"]


class AnalysisOptions(BaseModel):
    """How much to analyse, and the bottleneck budget of the published candidates."""

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

    def bottleneck(self) -> BottleneckSpec:
        """The bottleneck budget these options give each candidate (the API spells the
        training batch size ``train_batch_size``, beside the analysis ``batch_size``)."""
        return BottleneckSpec(
            compression_ratio=self.compression_ratio,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.train_batch_size,
            finetune_tail=self.finetune_tail,
        )


class AnalysisRequest(BaseModel):
    """Submit an analysis of an uploaded model (``POST /v1/models`` gives the ``model_id``)."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(pattern=r"^m-[0-9a-f]{12}$", description="from POST /v1/models")
    arch: str | None = Field(default=None, description="if given, must match the uploaded checkpoint")
    dataset: str = Field(min_length=1, max_length=512, description="fashion-mnist | digits | imagefolder:<path>")
    classes: list[StrictInt | str] | None = Field(
        default=None, max_length=100_000, description="class indices (integers) or names; null = all"
    )
    options: AnalysisOptions = Field(default_factory=AnalysisOptions)
    deployment: DeploymentSpec | None = Field(
        default=None,
        description="device, link, server and constraints (see `isplit plan`); when given, the candidates "
        "published to the trainer are the best cuts this deployment can use, and it is the plan's default",
    )


class AcceptedAnalysis(AnalysisRequest):
    """A request as the job stores it and its analysis process reads it: the dataset spec
    resolved (image folders as absolute paths under the data root), classes as label indices,
    and the checksum of the weights analysed."""

    classes: list[int] | None = Field(default=None, description="label indices; null = all")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool] = Field(description="dependency -> reachable")


class Accepted(BaseModel):
    id: str
    status: str
    status_url: str


class Progress(BaseModel):
    images_done: int
    images_total: int
    fraction: float


class PointView(BaseModel):
    """One cut point of the curve."""

    module: str
    kind: str
    skipped: bool
    log10_cui: float
    cui: float
    output_shape: list[int]
    output_bytes: int


class AnalysisSummary(BaseModel):
    """The curve and candidates of a finished analysis (the full report is ``result.json``)."""

    best: str
    candidates: list[str]
    ranking: list[str] = Field(description="the recommended cut first, then the other local maxima")
    size_ranking: list[str] = Field(description="smallest output first (the size baseline)")
    target: Literal["label", "predicted"]
    classes: list[int] | None
    num_images: int
    seconds: float
    images_per_second: float
    points: list[PointView]
    per_class_best: dict[str, str] = Field(description="class index -> that class's best cut")


class HeadArtifact(BaseModel):
    """One exported file of a trained head, fetched with ``url``."""

    format: str = Field(description="torchscript | onnx | executorch | program (torch.export, .pt2)")
    file: str
    bytes: int
    sha256: str | None = None
    opset: int | None = Field(default=None, description="ONNX opset (onnx only)")
    url: str


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
    head_artifacts: list[HeadArtifact] = Field(default_factory=list, description="the trained head, per format")


class Correlation(BaseModel):
    measured: int = Field(description="candidates with a measured accuracy")
    spearman_cui: float | None = Field(description="Spearman of measured accuracy vs CUI")
    spearman_size: float | None = Field(description="Spearman of measured accuracy vs smaller output size")


class AnalysisView(BaseModel):
    id: str
    owner: str | None = Field(default=None, description="the token principal that submitted it")
    status: Status
    progress: Progress
    request: dict[str, Any]
    error: str | None
    created_at: datetime
    updated_at: datetime
    result: AnalysisSummary | None = None
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
    owner: str | None = Field(default=None, description="the token principal that uploaded it")
    arch: str
    sha256: str
    size_bytes: int
    num_classes: int
    in_channels: int
    input_size: int
    class_names: list[str]
    test_accuracy: float | None
