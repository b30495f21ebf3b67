"""The sweep's result schema (``result.json``): parameters, measurements, correlations, picks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from isplit.checkpoint import ModelInfo
from isplit.data import DATASETS_HELP
from isplit.importance import (
    ImportanceCurve,
    Target,
)
from isplit.messages import BottleneckSpec

SCHEMA = "isplit-sweep/1"


class SweepConfig(BaseModel):
    """Every parameter of a sweep (recorded verbatim in the result)."""

    arch: str = Field(description="e.g. vgg16, vgg16_bn, resnet50 (see `isplit zoo list`)")
    width: float | None = Field(None, description="VGG channel multiplier (default: 1.0, or the checkpoint's)")
    dataset: str = Field(description=DATASETS_HELP)
    input_size: int | None = Field(
        None, description="pixels, square (default: 64 as the authors used it, or the checkpoint's)"
    )
    weights: str | None = Field(None, description="an existing checkpoint (`isplit zoo train`) instead of training one")
    epochs_model: int = Field(2, description="reference model training epochs")
    lr_model: float = Field(2e-3, description="reference model learning rate")
    batch_size_model: int = Field(128, description="reference model batch size")
    max_train_images: int | None = Field(None, description="images to train the model on (default: all)")
    epochs_bottleneck: int = Field(1, description="the same at every cut")
    seeds: int = Field(
        3, description="bottleneck trainings per measured cut (seeds seed, seed+1, ...); picks use the mean"
    )
    # Short budgets: 1e-3 leaves early-cut bottlenecks untrained.
    lr_bottleneck: float = Field(5e-3, description="peak of the one-cycle schedule")
    batch_size_bottleneck: int = Field(64, description="bottleneck batch size")
    bottleneck_images: int | None = Field(None, description="training images per bottleneck (default: the model's)")
    ratio: int = Field(4, description="bottleneck channel compression ratio")
    max_test_images: int | None = Field(2000, description="test images measured at each cut")
    analysis_images: int = Field(1000, description="images the importance engine analyses")
    analysis_split: Literal["train", "test"] = Field("test", description="the split the engine analyses")
    target: Target = Field(
        "label", description="the class whose score is backpropagated (the other target's curve is reported beside)"
    )
    budgets: list[float] = Field(
        [0.10, 0.25, 0.50], description="head-FLOPs budgets as fractions of the network, e.g. '0.1,0.25,0.5'"
    )
    cuts: list[str] | None = Field(None, description="comma-separated cut modules to measure")
    max_cuts: int | None = Field(None, description="measure N cuts evenly spanning the non-skipped ones")
    subsets: list[list[int | str]] | None = Field(
        None, description="class subsets (indices or names), e.g. '0,1;5,7,9' (default: searched)"
    )
    num_subsets: int = Field(2, description="subsets to search for when --subsets is not given")
    min_margin: float = Field(0.05, description="log10 CUI by which a subset's best must win to count as moved")
    subset_cuts: int = Field(4, description="cuts retrained on each subset's images")
    time_budget_s: float | None = Field(
        None, description="seconds for the whole sweep; retraining that would overrun is skipped"
    )
    permutations: int = Field(10000, description="Monte Carlo draws for p-values (n > 8)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = Field(0, description="seeds data order, initialisation and permutations")

    def bottleneck(self) -> BottleneckSpec:
        """The bottleneck budget of every cut this sweep measures (the fields are spelled with
        a ``_bottleneck`` suffix here, as recorded in ``result.json``)."""
        return BottleneckSpec(
            compression_ratio=self.ratio,
            epochs=self.epochs_bottleneck,
            lr=self.lr_bottleneck,
            batch_size=self.batch_size_bottleneck,
            seed=self.seed,
        )

    def bottleneck_seeds(self) -> list[BottleneckSpec]:
        """One bottleneck budget per seed (``seed``, ``seed + 1``, ...), otherwise identical."""
        base = self.bottleneck()
        return [base.model_copy(update={"seed": self.seed + i}) for i in range(self.seeds)]


class Machine(BaseModel):
    """Where the sweep ran."""

    platform: str
    python: str
    cpu_count: int | None
    torch_threads: int
    torch: str
    device: str
    device_name: str


class Correlation(BaseModel):
    """Rank agreement of a predictor with measured accuracy over ``n`` cuts.

    ``*_p`` are one-sided permutation p-values for a positive association (exact over all
    ``n!`` orderings up to n = 8, else Monte Carlo); None when the statistic is undefined.
    """

    n: int
    spearman: float | None
    spearman_p: float | None
    kendall: float | None
    kendall_p: float | None


class Pick(BaseModel):
    """The cut one method would choose, and what it measured (accuracy in [0, 1]).

    ``tied`` lists the other cuts the method cannot tell apart from ``module`` (equal output
    bytes for the size baseline); ``tie_mean_accuracy`` averages the measured ones.
    """

    method: Literal["cui", "size", "oracle"]
    module: str
    accuracy: float | None
    output_bytes: int
    tied: list[str] = Field(default_factory=list)
    tie_mean_accuracy: float | None = None
    accuracy_sd: float | None = None  # spread over the bottleneck seeds (sample standard deviation)
    head_flops_fraction: float | None = None


class BudgetPicks(BaseModel):
    """The picks of each method among the cuts whose head costs at most ``budget`` of the
    network's FLOPs, on the curve of ``target``: I-SPLIT's is the local maximum of the curve with the
    highest CUI inside the budget (as the planner recommends; when no local maximum fits, the cut with
    the highest CUI inside it), the size baseline's the smallest output inside it, the oracle's the best
    measured cut inside it. None where no cut qualifies (oracle: none measured inside the budget)."""

    budget: float
    target: Target
    cui_is_candidate: bool = True  # False: no local maximum fits, the pick is the best CUI inside the budget
    cui: Pick | None
    size: Pick | None
    oracle: Pick | None


class PartialCorrelation(BaseModel):
    """Partial Spearman of measured accuracy with log10 CUI given ``controls`` (``"size"`` =
    −output bytes, ``"depth"`` = position in the network), one-sided permutation p."""

    controls: list[str]
    n: int
    rho: float | None
    p: float | None


class CutMeasurement(BaseModel):
    """One cut, bottleneck trained on all classes. Accuracies in [0, 1], times in seconds."""

    module: str
    kind: str
    position: int  # index among the non-skipped cut points, in network order
    output_shape: list[int]
    output_bytes: int  # per image, fp32, before the bottleneck
    code_shape: list[int]  # per image, after the encoder
    log10_cui: float
    accuracy: float  # mean over the seeds
    per_class_accuracy: list[float | None]  # None for a class absent from the test set; mean over the seeds
    training_seconds: float  # all seeds together
    added_for_picks: bool = False  # not in the requested cuts; measured because a method picks it
    accuracies: list[float] = Field(default_factory=list)  # one per seed
    accuracy_sd: float | None = None  # sample standard deviation over the seeds
    head_flops_fraction: float | None = None


class SubsetCutMeasurement(BaseModel):
    """One cut, bottleneck trained on a class subset's images, measured on that subset."""

    module: str
    output_bytes: int
    log10_cui: float  # on the subset's curve
    accuracy: float  # mean over the seeds
    accuracy_all_class_bottleneck: float | None  # the all-class bottleneck on the same images
    training_images: int
    training_seconds: float
    accuracies: list[float] = Field(default_factory=list)  # one per seed
    accuracy_sd: float | None = None


class SubsetResult(BaseModel):
    """A class subset: its curve's best cut against the all-class best, and measurements."""

    classes: list[int]
    class_names: list[str]
    chosen: Literal["given", "auto"]
    analysis_images: int
    best: str
    candidates: list[str]
    all_class_best: str
    best_moved: bool
    decisive: bool  # moved, and by at least min_margin (not a near-tie)
    margin: float  # log10 CUI of the subset curve at its best minus at the all-class best
    log10_cui: list[float]  # aligned with SweepResult.curve.points
    correlation_all_class_bottlenecks: Correlation  # subset CUI vs subset accuracy of the all-class bottlenecks
    measurements: list[SubsetCutMeasurement]


class Picks(BaseModel):
    cui: Pick
    size: Pick
    oracle: Pick


class SizeControl(BaseModel):
    """Does CUI tell more than size? ``agreement`` is Spearman of log10 CUI with −output bytes
    over the measured cuts (where the two predictors agree, a sweep cannot tell them apart);
    the pair counts compare CUI's order with measured accuracy over pairs of measured cuts
    with *equal* output bytes, where size has nothing to say (ties on either side counted apart).
    """

    agreement: float | None
    equal_size_pairs: int
    concordant: int
    discordant: int
    tied: int


class SweepResult(BaseModel):
    """Everything a sweep measured (``result.json``)."""

    schema_: str = Field(SCHEMA, alias="schema")
    name: str
    command: str
    cwd: str
    started_at: str
    wall_seconds: float
    phase_seconds: dict[str, float]
    machine: Machine
    parameters: SweepConfig
    model: ModelInfo
    reference_accuracy: float  # the model without any split, on the measured test images
    train_images: int
    bottleneck_images: int
    test_images: int
    test_class_counts: list[int]
    curve: ImportanceCurve
    cuts: list[CutMeasurement]
    correlations: dict[str, Correlation]  # "cui", "size"
    size_control: SizeControl
    picks: Picks
    budget_picks: list[BudgetPicks] = Field(default_factory=list)  # per budget, for both targets
    partial_correlations: list[PartialCorrelation] = Field(default_factory=list)
    other_curve: ImportanceCurve | None = None  # the curve of the other target ("predicted" or "label")
    head_flops_fraction: dict[str, float] = Field(default_factory=dict)  # per cut module
    subsets: list[SubsetResult]
    skipped_for_budget: list[str]
    notes: list[str]

    model_config = {"populate_by_name": True}

    @model_validator(mode="before")
    @classmethod
    def _one_seed_before_seeds(cls, data: object) -> object:
        """Results written before sweeps had seeds trained one bottleneck per cut."""
        if isinstance(data, dict) and isinstance(data.get("parameters"), dict) and "seeds" not in data["parameters"]:
            data = {**data, "parameters": {**data["parameters"], "seeds": 1}}
        return data
