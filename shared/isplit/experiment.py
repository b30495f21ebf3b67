"""Re-measure I-SPLIT's claim: does the CUI curve predict the accuracy of a split?

One sweep, for a model and a dataset:

1. train the reference model (or load ``--weights``) and save its checkpoint;
2. one pass of the importance engine gives the all-class curve and, from the same per-class
   sums, the curve of any class subset; subsets whose best cut differs from the all-class
   best are found automatically (or given);
3. a bottleneck is trained at every measured cut with the same budget (epochs, images,
   learning rate, compression ratio) and the split model's test accuracy measured; for each
   subset, bottlenecks are also trained on that subset's images at a few cuts;
4. measured accuracy is compared with (a) log10 CUI and (b) the size baseline (smaller
   output bytes = better cut): Spearman and Kendall correlations with one-sided permutation
   p-values, and the accuracy of the cut each method would pick.

Everything lands in one JSON (:class:`SweepResult`); the Markdown report and the plot are
generated from that JSON alone (``isplit experiment report`` regenerates them).

This module imports no optional dependency at import time (matplotlib is imported only to
plot, scikit-learn only by the digits loader), so it runs where only torch, torchvision,
numpy, pillow, pydantic and tqdm are installed: ``python -m isplit.experiment sweep ...``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn
from tqdm.auto import tqdm

from isplit import IsplitError
from isplit.checkpoint import ModelInfo, load_model, save_checkpoint
from isplit.cuts import find_cut_points
from isplit.data import DATASETS_HELP, ImageSet, load_dataset, resolve_classes
from isplit.importance import (
    LOG10_FLOOR,
    ImportanceCurve,
    ImportanceStats,
    Target,
    accumulate_importance,
    curve_from_stats,
)
from isplit.messages import BottleneckSpec
from isplit.retrain import retrain_split
from isplit.stats import cut_predictors, kendall, permutation_p, spearman
from isplit.training import evaluate, pick_device, seed_everything, train_reference_model
from isplit.zoo import build_model

SCHEMA = "isplit-sweep/1"
UNTRAINED_GAP = 0.20  # median split accuracy this far below the unsplit model: the budget, not the cut, decided
SIGNIFICANCE = 0.05  # one-sided permutation p below this counts as evidence of a positive association


# -- the result schema (result.json) --------------------------------------------------------


class SweepConfig(BaseModel):
    """Every parameter of a sweep (recorded verbatim in the result)."""

    arch: str
    width: float | None = None  # None: the checkpoint's with ``weights``, else 1.0
    dataset: str
    input_size: int | None = None  # None: the checkpoint's with ``weights``, else 32
    weights: str | None = None
    epochs_model: int = 2
    lr_model: float = 2e-3
    batch_size_model: int = 128
    max_train_images: int | None = None
    epochs_bottleneck: int = 1
    lr_bottleneck: float = 5e-3  # short budgets: 1e-3 leaves early-cut bottlenecks untrained
    batch_size_bottleneck: int = 64
    bottleneck_images: int | None = None
    ratio: int = 4
    max_test_images: int | None = 2000
    analysis_images: int = 1000
    analysis_split: Literal["train", "test"] = "test"
    target: Target = "label"
    cuts: list[str] | None = None
    max_cuts: int | None = None
    subsets: list[list[int | str]] | None = None  # class indices or names
    num_subsets: int = 2
    min_margin: float = 0.05  # log10 CUI: a subset's best cut must beat the all-class best by this to count
    subset_cuts: int = 4
    time_budget_s: float | None = None
    permutations: int = 10000
    device: str = "auto"
    seed: int = 0

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


class CutMeasurement(BaseModel):
    """One cut, bottleneck trained on all classes. Accuracies in [0, 1], times in seconds."""

    module: str
    kind: str
    position: int  # index among the non-skipped cut points, in network order
    output_shape: list[int]
    output_bytes: int  # per image, fp32, before the bottleneck
    code_shape: list[int]  # per image, after the encoder
    log10_cui: float
    accuracy: float
    per_class_accuracy: list[float | None]  # None for a class absent from the test set
    training_seconds: float
    added_for_picks: bool = False  # not in the requested cuts; measured because a method picks it


class SubsetCutMeasurement(BaseModel):
    """One cut, bottleneck trained on a class subset's images, measured on that subset."""

    module: str
    output_bytes: int
    log10_cui: float  # on the subset's curve
    accuracy: float
    accuracy_all_class_bottleneck: float | None  # the all-class bottleneck on the same images
    training_images: int
    training_seconds: float


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
    subsets: list[SubsetResult]
    skipped_for_budget: list[str]
    notes: list[str]

    model_config = {"populate_by_name": True}


# -- pure pieces ----------------------------------------------------------------------------


def spanning_order(n: int) -> list[int]:
    """``0..n-1`` ordered so that every prefix spans the range: ends first, then midpoints.

    Work done in this order and cut short by a time budget still covers the whole network.
    """
    if n <= 0:
        return []
    order = [0] + ([n - 1] if n > 1 else [])
    gaps = [(0, n - 1)]
    while gaps:
        next_gaps = []
        for lo, hi in gaps:
            if hi - lo > 1:
                mid = (lo + hi) // 2
                order.append(mid)
                next_gaps += [(lo, mid), (mid, hi)]
        gaps = next_gaps
    return order


def choose_cuts(active: Sequence[str], cuts: Sequence[str] | None, max_cuts: int | None) -> list[str]:
    """The cuts to measure, in network order: ``cuts`` as given (validated), or ``max_cuts``
    evenly spanning ``active`` (the non-skipped cut points), or all of ``active``."""
    if cuts:
        bad = [c for c in cuts if c not in active]
        if bad:
            raise IsplitError(f"cut {bad[0]!r} is not a non-skipped cut point; choose from: {', '.join(active)}")
        return [c for c in active if c in set(cuts)]
    if max_cuts is None or max_cuts >= len(active):
        return list(active)
    if max_cuts < 2:
        raise IsplitError(f"max-cuts must be >= 2 to span the network, got {max_cuts}")
    idx = sorted({round(i * (len(active) - 1) / (max_cuts - 1)) for i in range(max_cuts)})
    return [active[i] for i in idx]


def correlate(predicted: Sequence[float], measured: Sequence[float], *, permutations: int, seed: int) -> Correlation:
    """Spearman and Kendall of ``predicted`` with ``measured``, with permutation p-values."""
    if len(predicted) < 3:
        return Correlation(n=len(predicted), spearman=None, spearman_p=None, kendall=None, kendall_p=None)
    return Correlation(
        n=len(predicted),
        spearman=spearman(predicted, measured),
        spearman_p=permutation_p(spearman, predicted, measured, permutations=permutations, seed=seed),
        kendall=kendall(predicted, measured),
        kendall_p=permutation_p(kendall, predicted, measured, permutations=permutations, seed=seed + 1),
    )


def size_pick(curve: ImportanceCurve) -> tuple[str, list[str]]:
    """The size baseline's cut: the smallest output (the earliest such cut, which keeps the
    least work on the edge), and the other cuts with exactly that size."""
    active = [p for p in curve.points if not p.skipped]
    smallest = min(p.output_bytes for p in active)
    tied = [p.module for p in active if p.output_bytes == smallest]
    return tied[0], tied[1:]


def subset_search(
    stats: ImportanceStats,
    all_best: str,
    *,
    count: int,
    min_margin: float = 0.05,
    sizes: Sequence[int] = (2, 3),
) -> list[tuple[list[int], ImportanceCurve]]:
    """Class subsets whose curve peaks at a cut other than ``all_best``, most decisive first.

    Searches all pairs and triples of analysed classes. The margin of a subset is its
    curve's log10 CUI at its own best minus at ``all_best``. Subsets whose margin reaches
    ``min_margin`` come first, then those that move the best cut only within a near-tie;
    within each group, larger margins first, preferring a best cut no earlier pick has, then
    classes disjoint from earlier picks. When fewer than ``count`` subsets move the best cut,
    the rest are the subsets whose curves rank ``all_best`` lowest (their ``best`` equals
    ``all_best`` or ties with it: not moves; the report says so).
    """
    present = [k for k in range(stats.counts.numel()) if int(stats.counts[k]) > 0]
    scored: list[tuple[float, list[int], ImportanceCurve]] = []
    for size in sizes:
        for combo in itertools.combinations(present, size):
            curve = curve_from_stats(stats, list(combo))
            scored.append((_margin(curve, all_best), list(combo), curve))
    # A margin of 0 is a tie broken by network order, not a move.
    moved = sorted((s for s in scored if s[2].best != all_best and s[0] > 0), key=lambda s: -s[0])
    chosen: list[tuple[list[int], ImportanceCurve]] = []
    for group in ([s for s in moved if s[0] >= min_margin], [s for s in moved if s[0] < min_margin]):
        while group and len(chosen) < count:
            bests = {c.best for _, c in chosen}
            used = {k for classes, _ in chosen for k in classes}
            pool = (
                [s for s in group if s[2].best not in bests and not used & set(s[1])]
                or [s for s in group if s[2].best not in bests]
                or [s for s in group if not used & set(s[1])]
                or group
            )
            _, classes, curve = pool[0]
            chosen.append((classes, curve))
            group = [s for s in group if s[1] != classes]
    if len(chosen) < count:
        taken = [classes for classes, _ in chosen]
        rest = sorted((s for s in scored if s[1] not in taken), key=lambda s: _rank_of(s[2], all_best), reverse=True)
        chosen += [(classes, curve) for _, classes, curve in rest[: count - len(chosen)]]
    return chosen


def _margin(curve: ImportanceCurve, all_best: str) -> float:
    return curve.point(curve.best).log10_cui - curve.point(all_best).log10_cui


def _rank_of(curve: ImportanceCurve, module: str) -> int:
    active = sorted((p for p in curve.points if not p.skipped), key=lambda p: -p.log10_cui)
    return [p.module for p in active].index(module)


def _subset_accuracy(per_class: Sequence[float | None], counts: Sequence[int], classes: Sequence[int]) -> float | None:
    correct = sum((per_class[k] or 0.0) * counts[k] for k in classes)
    total = sum(counts[k] for k in classes)
    return correct / total if total else None


def _pick(method: Literal["cui", "size", "oracle"], module: str, tied: Sequence[str], cuts: Sequence[CutMeasurement]):
    by_module = {c.module: c for c in cuts}
    measured = by_module.get(module)
    tie_acc = [by_module[m].accuracy for m in [module, *tied] if m in by_module]
    return Pick(
        method=method,
        module=module,
        accuracy=measured.accuracy if measured else None,
        output_bytes=measured.output_bytes if measured else 0,
        tied=list(tied),
        tie_mean_accuracy=sum(tie_acc) / len(tie_acc) if tied and tie_acc else None,
    )


def size_control(cuts: Sequence[CutMeasurement]) -> SizeControl:
    """CUI against accuracy where size cannot discriminate (see :class:`SizeControl`)."""
    concordant = discordant = tied = pairs = 0
    for a, b in itertools.combinations(cuts, 2):
        if a.output_bytes != b.output_bytes:
            continue
        pairs += 1
        order = (a.log10_cui > b.log10_cui) - (a.log10_cui < b.log10_cui)
        measured = (a.accuracy > b.accuracy) - (a.accuracy < b.accuracy)
        if order == 0 or measured == 0:
            tied += 1
        elif order == measured:
            concordant += 1
        else:
            discordant += 1
    predictors = cut_predictors([c.log10_cui for c in cuts], [c.output_bytes for c in cuts])
    agreement = spearman(predictors["cui"], predictors["size"]) if len(cuts) >= 3 else None
    return SizeControl(
        agreement=agreement, equal_size_pairs=pairs, concordant=concordant, discordant=discordant, tied=tied
    )


def evaluate_claim(
    curve: ImportanceCurve, cuts: Sequence[CutMeasurement], *, permutations: int, seed: int
) -> tuple[dict[str, Correlation], Picks]:
    """Correlations of measured accuracy with log10 CUI and with -output_bytes, and the picks."""
    acc = [c.accuracy for c in cuts]
    predictors = cut_predictors([c.log10_cui for c in cuts], [c.output_bytes for c in cuts])
    correlations = {
        "cui": correlate(predictors["cui"], acc, permutations=permutations, seed=seed),
        "size": correlate(predictors["size"], acc, permutations=permutations, seed=seed + 2),
    }
    size_module, size_tied = size_pick(curve)
    oracle = max(cuts, key=lambda c: c.accuracy) if cuts else None
    oracle_tied = [c.module for c in cuts if oracle and c.accuracy == oracle.accuracy and c is not oracle]
    picks = Picks(
        cui=_pick("cui", curve.best, [], cuts),
        size=_pick("size", size_module, size_tied, cuts),
        oracle=_pick("oracle", oracle.module if oracle else curve.best, oracle_tied, cuts),
    )
    point = {p.module: p for p in curve.points}
    for pick in (picks.cui, picks.size, picks.oracle):
        pick.output_bytes = point[pick.module].output_bytes
    return correlations, picks


# -- running a sweep ------------------------------------------------------------------------


def machine_info(device: torch.device) -> Machine:
    """Platform, CPU count, torch version and accelerator of this process."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return Machine(
        platform=platform.platform(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=str(device),
        device_name=name,
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def per_class_accuracy(
    model: nn.Module, data: ImageSet, info: ModelInfo, device: torch.device, batch_size: int = 256
) -> list[float | None]:
    """Top-1 accuracy of ``model`` per class of ``data`` (None for an absent class), eval mode."""
    k = len(data.class_names)
    correct = torch.zeros(k, dtype=torch.int64)
    total = torch.zeros(k, dtype=torch.int64)
    was_training = model.training
    model.eval()
    for images, labels in data.batches(batch_size, input_size=info.input_size, mean=info.mean, std=info.std):
        pred = model(images.to(device)).argmax(1).cpu()
        total += torch.bincount(labels, minlength=k)
        correct += torch.bincount(labels[pred == labels], minlength=k)
    model.train(was_training)
    return [int(c) / int(t) if int(t) else None for c, t in zip(correct, total, strict=True)]


class _Budget:
    """Wall-clock budget for the retraining work: refuses a job that would likely overrun."""

    def __init__(self, start: float, seconds: float | None) -> None:
        self.start, self.seconds = start, seconds
        self.durations: list[float] = []

    def allows(self, scale: float = 1.0) -> bool:
        if self.seconds is None or not self.durations:
            return True
        expected = scale * sum(self.durations) / len(self.durations)
        return time.perf_counter() - self.start + expected <= self.seconds

    def record(self, seconds: float) -> None:
        self.durations.append(seconds)


def _load_reference(cfg: SweepConfig, train: ImageSet) -> tuple[nn.Module, ModelInfo]:
    """The ``--weights`` checkpoint, checked against the dataset and any explicit width/size."""
    assert cfg.weights is not None
    model, info = load_model(Path(cfg.weights), arch=cfg.arch)
    if info.num_classes != len(train.class_names) or info.in_channels != train.in_channels:
        raise IsplitError(
            f"weights {cfg.weights} hold a {info.num_classes}-class, {info.in_channels}-channel model; dataset "
            f"{cfg.dataset!r} has {len(train.class_names)} classes and {train.in_channels} channels"
        )
    for name, given, saved in (("width", cfg.width, info.width), ("input-size", cfg.input_size, info.input_size)):
        if given is not None and given != saved:
            raise IsplitError(f"--{name} {given} contradicts the checkpoint {cfg.weights}, which has {saved}")
    return model, info


def _prepare_model(
    cfg: SweepConfig, train: ImageSet, test: ImageSet, device: torch.device, save_weights: Path | None
) -> tuple[nn.Module, ModelInfo]:
    if cfg.weights:
        model, info = _load_reference(cfg, train)
        return model.to(device).eval(), info
    assert cfg.width is not None and cfg.input_size is not None
    model, info, _ = train_reference_model(
        cfg.arch,
        cfg.dataset,
        train,
        test,
        input_size=cfg.input_size,
        width=cfg.width,
        epochs=cfg.epochs_model,
        batch_size=cfg.batch_size_model,
        lr=cfg.lr_model,
        device=device,
        seed=cfg.seed,
        extra={"made_by": "experiment sweep"},
    )
    if save_weights is not None:
        save_checkpoint(save_weights, model, info)
    return model, info


def _check_cuts(cfg: SweepConfig, num_classes: int, in_channels: int) -> None:
    """Validate ``cfg.cuts``/``cfg.max_cuts`` against the architecture's cut points."""
    assert cfg.width is not None and cfg.input_size is not None
    skeleton = build_model(
        cfg.arch, num_classes=num_classes, in_channels=in_channels, input_size=cfg.input_size, width=cfg.width
    )
    points = find_cut_points(skeleton, (in_channels, cfg.input_size, cfg.input_size))
    choose_cuts([p.module for p in points if not p.skipped], cfg.cuts, cfg.max_cuts)


def _check_config(cfg: SweepConfig) -> None:
    positive = {
        "epochs_model": cfg.epochs_model,
        "epochs_bottleneck": cfg.epochs_bottleneck,
        "ratio": cfg.ratio,
        "analysis_images": cfg.analysis_images,
        "num_subsets": cfg.num_subsets,
        "subset_cuts": cfg.subset_cuts,
        "permutations": cfg.permutations,
        "batch_size_model": cfg.batch_size_model,
        "batch_size_bottleneck": cfg.batch_size_bottleneck,
    }
    for name, value in positive.items():
        if value < 1:
            raise IsplitError(f"{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("max_train_images", "bottleneck_images", "max_test_images"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise IsplitError(f"{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.time_budget_s is not None and cfg.time_budget_s <= 0:
        raise IsplitError(f"time-budget must be > 0 seconds, got {cfg.time_budget_s}")


def run_sweep(
    cfg: SweepConfig,
    *,
    name: str = "sweep",
    save_weights: Path | None = None,
    command: str | None = None,
    notes: Sequence[str] = (),
    progress: bool = True,
) -> SweepResult:
    """Run the whole sweep described by ``cfg`` (see the module docstring); returns the result.

    ``save_weights`` is where a freshly trained reference model is saved (None: not saved);
    ``command`` is recorded as the exact command line (default: this process's argv);
    ``notes`` are recorded and printed in the report.
    """
    _check_config(cfg)
    if not cfg.weights:
        cfg = cfg.model_copy(update={"width": cfg.width or 1.0, "input_size": cfg.input_size or 32})
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    notes: list[str] = list(notes)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
        notes.append("CUDA: cuDNN autotuning and TF32 matmuls on; bottlenecks train under bf16 autocast")
    seed_everything(cfg.seed)

    full_train = load_dataset(cfg.dataset, "train")
    full_test = load_dataset(cfg.dataset, "test")
    train = full_train.subset(None, cfg.max_train_images) if cfg.max_train_images else full_train
    test = full_test.subset(None, cfg.max_test_images) if cfg.max_test_images else full_test
    fit = train.subset(None, cfg.bottleneck_images) if cfg.bottleneck_images else train
    class_names = full_train.class_names
    subsets_given = [resolve_classes(s, class_names) or [] for s in cfg.subsets] if cfg.subsets else None
    if not cfg.weights:
        _check_cuts(cfg, len(class_names), full_train.in_channels)  # before minutes of training

    phase = time.perf_counter()
    model, info = _prepare_model(cfg, train, test, device, save_weights)
    phases["model"] = time.perf_counter() - phase
    if cfg.weights:
        cfg = cfg.model_copy(update={"width": info.width, "input_size": info.input_size})
        notes.append(f"reference model loaded from {cfg.weights}")
        reference_accuracy = evaluate(
            model, test.batches(256, input_size=info.input_size, mean=info.mean, std=info.std), device
        )
    else:
        reference_accuracy = info.test_accuracy or 0.0  # measured on the same test images

    phase = time.perf_counter()
    source = full_train if cfg.analysis_split == "train" else full_test
    analysed = source.subset(None, cfg.analysis_images)
    stats = accumulate_importance(
        model,
        analysed.batches(64, input_size=info.input_size, mean=info.mean, std=info.std),
        target=cfg.target,
        device=device,
        progress=progress,
        total=len(analysed),
    )
    curve = curve_from_stats(stats)
    if subsets_given is not None:
        subset_curves = [(s, curve_from_stats(stats, s)) for s in subsets_given]
    else:
        subset_curves = subset_search(stats, curve.best, count=cfg.num_subsets, min_margin=cfg.min_margin)
    phases["importance"] = time.perf_counter() - phase

    active = [p for p in curve.points if not p.skipped]
    position = {p.module: i for i, p in enumerate(active)}
    requested = choose_cuts([p.module for p in active], cfg.cuts, cfg.max_cuts)
    size_module, _ = size_pick(curve)
    forced = [m for m in dict.fromkeys([curve.best, size_module]) if m not in requested]
    ordered = forced + [requested[i] for i in spanning_order(len(requested))]

    budget = _Budget(t0, cfg.time_budget_s)
    skipped: list[str] = []
    cuts: list[CutMeasurement] = []
    phase = time.perf_counter()
    bar = tqdm(ordered, desc="cuts (all classes)", unit="cut", disable=not progress)
    for module in bar:
        if not budget.allows():
            skipped.append(module)
            continue
        bar.set_postfix(cut=module)
        job = time.perf_counter()
        cuts.append(_measure_cut(model, info, module, fit, test, cfg, device, curve, position, module in forced))
        budget.record(time.perf_counter() - job)
        tqdm.write(f"  {module:<24} log10 CUI {cuts[-1].log10_cui:8.3f}  accuracy {cuts[-1].accuracy:.4f}")
    bar.close()
    cuts.sort(key=lambda c: c.position)
    phases["retrain_all_classes"] = time.perf_counter() - phase

    test_counts = torch.bincount(test.labels, minlength=len(class_names)).tolist()
    phase = time.perf_counter()
    subsets = [
        _measure_subset(
            model,
            info,
            classes,
            sub_curve,
            curve,
            cuts,
            full_train,
            len(fit),
            test,
            cfg,
            device,
            budget,
            skipped,
            test_counts,
            chosen="given" if subsets_given is not None else "auto",
            progress=progress,
        )  # fmt: skip
        for classes, sub_curve in subset_curves
    ]
    phases["retrain_subsets"] = time.perf_counter() - phase

    correlations, picks = evaluate_claim(curve, cuts, permutations=cfg.permutations, seed=cfg.seed)
    if skipped:
        notes.append(f"time budget of {cfg.time_budget_s} s reached: {len(skipped)} retraining job(s) skipped")
    return SweepResult(
        name=name,
        command=command if command is not None else _command_line(),
        cwd=os.getcwd(),
        started_at=started_at,
        wall_seconds=time.perf_counter() - t0,
        phase_seconds={k: round(v, 2) for k, v in phases.items()},
        machine=machine_info(device),
        parameters=cfg,
        model=info,
        reference_accuracy=reference_accuracy,
        train_images=int(info.extra.get("train_images", len(train))) if cfg.weights else len(train),
        bottleneck_images=len(fit),
        test_images=len(test),
        test_class_counts=test_counts,
        curve=curve,
        cuts=cuts,
        correlations=correlations,
        size_control=size_control(cuts),
        picks=picks,
        subsets=subsets,
        skipped_for_budget=skipped,
        notes=notes,
    )


def _command_line() -> str:
    """This process's command line as a user would type it."""
    if sys.argv and Path(sys.argv[0]).name == "experiment.py":
        return shlex.join(["python", "-m", "isplit.experiment", *sys.argv[1:]])
    return shlex.join(["isplit", *sys.argv[1:]])


def _measure_cut(
    model: nn.Module,
    info: ModelInfo,
    module: str,
    fit: ImageSet,
    test: ImageSet,
    cfg: SweepConfig,
    device: torch.device,
    curve: ImportanceCurve,
    position: dict[str, int],
    forced: bool,
) -> CutMeasurement:
    outcome = retrain_split(
        model,
        info,
        module,
        fit,
        test,
        cfg.bottleneck(),
        device=device,
    )
    split = nn.Sequential(outcome.pair.head, outcome.pair.tail).eval()
    point = curve.point(module)
    return CutMeasurement(
        module=module,
        kind=point.kind,
        position=position[module],
        output_shape=point.output_shape,
        output_bytes=point.output_bytes,
        code_shape=outcome.pair.code_shape,
        log10_cui=point.log10_cui,
        accuracy=outcome.accuracy_split,
        per_class_accuracy=per_class_accuracy(split, test, info, device),
        training_seconds=outcome.training_seconds,
        added_for_picks=forced,
    )


def _measure_subset(
    model: nn.Module,
    info: ModelInfo,
    classes: list[int],
    sub_curve: ImportanceCurve,
    curve: ImportanceCurve,
    all_cuts: list[CutMeasurement],
    pool: ImageSet,
    fit_size: int,
    test: ImageSet,
    cfg: SweepConfig,
    device: torch.device,
    budget: _Budget,
    skipped: list[str],
    test_counts: list[int],
    *,
    chosen: Literal["given", "auto"],
    progress: bool,
) -> SubsetResult:
    from_all = {c.module: _subset_accuracy(c.per_class_accuracy, test_counts, classes) for c in all_cuts}
    measured_all = [c for c in all_cuts if from_all[c.module] is not None]
    correlation = correlate(
        [sub_curve.point(c.module).log10_cui for c in measured_all],
        [from_all[c.module] or 0.0 for c in measured_all],
        permutations=cfg.permutations,
        seed=cfg.seed + 7,
    )
    plan = _subset_plan(sub_curve, curve, cfg.subset_cuts)
    # As many training images as an all-class bottleneck gets (same steps), from the whole split.
    fit_subset = pool.subset(classes, fit_size)
    test_subset = test.subset(classes)
    share = len(fit_subset) / max(fit_size, 1)
    measurements: list[SubsetCutMeasurement] = []
    label = ",".join(map(str, classes))
    for module in tqdm(plan, desc=f"cuts (classes {label})", unit="cut", disable=not progress):
        if not budget.allows(scale=share):
            skipped.append(f"{module} (classes {label})")
            continue
        job = time.perf_counter()
        outcome = retrain_split(
            model,
            info,
            module,
            fit_subset,
            test_subset,
            cfg.bottleneck(),
            classes=classes,
            device=device,
        )
        budget.record((time.perf_counter() - job) / max(share, 1e-9))
        measurements.append(
            SubsetCutMeasurement(
                module=module,
                output_bytes=sub_curve.point(module).output_bytes,
                log10_cui=sub_curve.point(module).log10_cui,
                accuracy=outcome.accuracy_split_subset if outcome.accuracy_split_subset is not None else 0.0,
                accuracy_all_class_bottleneck=from_all.get(module),
                training_images=len(fit_subset),
                training_seconds=outcome.training_seconds,
            )
        )
        tqdm.write(f"  [{label}] {module:<20} log10 CUI {sub_curve.point(module).log10_cui:8.3f}  accuracy "
                   f"{measurements[-1].accuracy:.4f}")  # fmt: skip
    active = [p.module for p in curve.points if not p.skipped]
    measurements.sort(key=lambda m: active.index(m.module))
    return SubsetResult(
        classes=classes,
        class_names=[info.class_names[k] for k in classes],
        chosen=chosen,
        analysis_images=sub_curve.num_images,
        best=sub_curve.best,
        candidates=sub_curve.candidates,
        all_class_best=curve.best,
        best_moved=sub_curve.best != curve.best,
        decisive=sub_curve.best != curve.best and _margin(sub_curve, curve.best) >= cfg.min_margin,
        margin=_margin(sub_curve, curve.best),
        log10_cui=[p.log10_cui for p in sub_curve.points],
        correlation_all_class_bottlenecks=correlation,
        measurements=measurements,
    )


def _subset_plan(sub_curve: ImportanceCurve, curve: ImportanceCurve, limit: int) -> list[str]:
    """Cuts to retrain on a subset: its best, the all-class best, then its other candidates
    (highest first), then the size pick; at most ``limit``, in that order of priority."""
    others = sorted(
        (m for m in sub_curve.candidates if m != sub_curve.best), key=lambda m: -sub_curve.point(m).log10_cui
    )
    plan = list(dict.fromkeys([sub_curve.best, curve.best, *others, size_pick(curve)[0]]))
    return plan[:limit]


# -- outputs: JSON, Markdown report, plot ---------------------------------------------------


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _strength(rho: float) -> str:
    a = abs(rho)
    return "strong" if a >= 0.6 else "moderate" if a >= 0.3 else "weak"


def _std_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` test images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(n, 1))


def verdict(result: SweepResult) -> list[str]:
    """Plain-language conclusions derived from the numbers alone, headline first.

    Rules for the ranking claim (log10 CUI vs measured accuracy, Spearman, one-sided
    permutation p): *held* when ρ > 0 with p < 0.05 and ρ beats the size baseline's;
    *held only partly* when significant but no better than size; *not supported* when ρ > 0
    but p >= 0.05; *did not hold* when ρ <= 0, *contradicted* when moreover p >= 0.95
    (CUI ranks cuts against accuracy). Whatever the correlation, the result is
    *inconclusive* when the measured accuracies span less than twice the test-set standard
    error, or when the median split accuracy is more than 20 points below the unsplit model's
    (the bottlenecks did not train). Accuracy gaps below twice their standard error are
    called within noise.
    """
    cui, size = result.correlations["cui"], result.correlations["size"]
    n_test = result.test_images
    accs = [c.accuracy for c in result.cuts]
    spread = max(accs) - min(accs) if accs else 0.0
    se_mean = _std_error(sum(accs) / len(accs), n_test) if accs else 0.0
    noise_only = bool(accs) and spread < 2 * se_mean
    median = sorted(accs)[len(accs) // 2] if accs else 0.0
    untrained = bool(accs) and result.reference_accuracy - median > UNTRAINED_GAP
    lines: list[str] = []
    if cui.spearman is None or cui.n < 4:
        lines.append(f"**Not judged**: only {cui.n} cuts were measured (or accuracy did not vary); no ranking claim.")
    else:
        stats = (
            f"Spearman ρ = {cui.spearman:+.2f} (one-sided permutation p = {_num(cui.spearman_p, 3)}), "
            f"Kendall τ = {_signed(cui.kendall, 2)} (p = {_num(cui.kendall_p, 3)}), n = {cui.n} cuts"
        )
        size_text = (
            f"the size baseline's ρ = {_signed(size.spearman, 2)} (p = {_num(size.spearman_p, 3)}), "
            f"τ = {_signed(size.kendall, 2)}"
        )
        p = cui.spearman_p if cui.spearman_p is not None else 1.0
        significant = cui.spearman > 0 and p < SIGNIFICANCE
        beats_size = size.spearman is None or cui.spearman > size.spearman
        if noise_only:
            head = "**Inconclusive**: the cuts' measured accuracies are within test-set noise of each other"
        elif untrained:
            head = (
                f"**Inconclusive**: most bottlenecks did not train within the budget (median split accuracy "
                f"{_pct(median)} against {_pct(result.reference_accuracy)} unsplit), so the measurements say "
                "little about the cuts"
            )
        elif significant and beats_size:
            head = (
                f"**The claim held here ({_strength(cui.spearman)})**: log10 CUI ranks the cuts like their "
                "measured accuracy, better than layer size does"
            )
        elif significant:
            head = (
                "**The claim held only partly**: log10 CUI correlates with measured accuracy, but no better "
                "than layer size does"
            )
        elif cui.spearman > 0:
            head = (
                f"**The claim was not supported here**: the correlation is positive ({_strength(cui.spearman)}) "
                f"but not distinguishable from chance at n = {cui.n}"
            )
        elif p >= 1 - SIGNIFICANCE:
            head = "**The claim was contradicted here**: log10 CUI ranks the cuts against their measured accuracy"
        else:
            head = "**The claim did not hold here**: log10 CUI shows no positive association with measured accuracy"
        lines.append(f"{head} — {stats}; {size_text}.")
    picks = result.picks
    if picks.cui.accuracy is not None and picks.size.accuracy is not None and picks.oracle.accuracy is not None:
        gap = picks.cui.accuracy - picks.size.accuracy
        se = math.sqrt(_std_error(picks.cui.accuracy, n_test) ** 2 + _std_error(picks.size.accuracy, n_test) ** 2)
        if abs(gap) < 1e-12:
            compare = "the same as"
        else:
            noise = ", within test-set noise" if abs(gap) < 2 * se else ""
            compare = f"{abs(100 * gap):.1f} points {'above' if gap > 0 else 'below'}{noise},"
        lines.append(
            f"Picks: CUI's cut `{picks.cui.module}` measured {_pct(picks.cui.accuracy)}, {compare} the size "
            f"baseline's `{picks.size.module}` ({_pct(picks.size.accuracy)}); the best measured cut, "
            f"`{picks.oracle.module}`, reached {_pct(picks.oracle.accuracy)} "
            f"({100 * (picks.oracle.accuracy - picks.cui.accuracy):.1f} points above CUI's pick)."
        )
    if accs:
        budget_note = (
            " The bottleneck budget was too small for most cuts to recover the model's accuracy: the ranking then "
            "reflects how fast each bottleneck trains as much as what its cut preserves."
            if result.reference_accuracy - median > 0.10
            else ""
        )
        lines.append(
            f"The unsplit model scores {_pct(result.reference_accuracy)}; the split models {_pct(min(accs))} to "
            f"{_pct(max(accs))} (median {_pct(median)}).{budget_note}"
        )
        if noise_only:
            lines.append(
                f"Caution: measured accuracies span only {100 * spread:.1f} points, less than twice the test-set "
                f"standard error ({100 * se_mean:.1f} points on {n_test} images): the ranking is mostly noise."
            )
        else:
            lines.append(
                f"Measured accuracies span {100 * spread:.1f} points across cuts "
                f"(test-set standard error ≈ {100 * se_mean:.1f} points on {n_test} images)."
            )
    control = result.size_control
    if control.agreement is not None:
        within = (
            f"among the {control.equal_size_pairs} pairs of measured cuts with equal output size, where size cannot "
            f"choose, CUI ordered {control.concordant} like their accuracy, {control.discordant} against it and "
            f"{control.tied} with an exact tie"
            if control.equal_size_pairs
            else "no two measured cuts have the same output size, so CUI was not tested where size cannot choose"
        )
        consequence = ""
        if control.agreement > 0.5:
            consequence = (
                ", so much of CUI's correlation may be size's"
                if (cui.spearman or 0) > 0
                else ", so this sweep can hardly tell them apart"
            )
        lines.append(
            f"CUI and size agree with each other at ρ = {control.agreement:+.2f} over these cuts{consequence}; {within}."
        )
    if result.subsets:
        margin = result.parameters.min_margin
        decisive = [s for s in result.subsets if s.decisive]
        near = [s for s in result.subsets if s.best_moved and not s.decisive]
        if decisive:
            lines.append(
                f"The predicted best cut moved decisively (by ≥ {margin} in log10 CUI) for {len(decisive)} of "
                f"{len(result.subsets)} class subsets: {_moves(decisive)}."
            )
        if near:
            lines.append(
                f"For {len(near)} subset(s) the best cut moved only within a near-tie (margin < {margin} in log10 "
                f"CUI, i.e. the curve's top is flat there): {_moves(near)}."
            )
        if not decisive and not near:
            lines.append("No class subset searched moved the predicted best cut away from the all-class best.")
        for s in result.subsets:
            lines.append(_subset_conclusion(s, result.test_class_counts))
    return lines


def _moves(subsets: Sequence[SubsetResult]) -> str:
    return "; ".join(
        f"{{{', '.join(s.class_names)}}}: `{s.all_class_best}` → `{s.best}` (margin {s.margin:.3f})" for s in subsets
    )


def _subset_conclusion(s: SubsetResult, test_counts: Sequence[int]) -> str:
    by_module = {m.module: m for m in s.measurements}
    label = "{" + ", ".join(s.class_names) + "}"
    own, shared = by_module.get(s.best), by_module.get(s.all_class_best)
    if not s.best_moved:
        return f"Subset {label}: its curve peaks at the all-class best `{s.best}`; nothing to compare."
    if own is None or shared is None:
        return f"Subset {label}: the retraining needed to compare `{s.best}` with `{s.all_class_best}` was not done."
    n = sum(test_counts[k] for k in s.classes)
    gap = own.accuracy - shared.accuracy
    se = math.sqrt(_std_error(own.accuracy, n) ** 2 + _std_error(shared.accuracy, n) ** 2)
    if abs(gap) < 2 * se:
        outcome = f"a difference of {100 * gap:+.1f} points, within test-set noise"
    elif gap > 0:
        outcome = f"{100 * gap:.1f} points better, as the subset curve predicts"
    else:
        outcome = f"{100 * -gap:.1f} points worse, against the subset curve's prediction"
    return (
        f"Subset {label}: with bottlenecks trained on its images, its own best cut `{s.best}` measured "
        f"{_pct(own.accuracy)} vs {_pct(shared.accuracy)} at the all-class best `{s.all_class_best}` — {outcome} "
        f"({n} test images)."
    )


def render_report(result: SweepResult, plot_name: str | None = None) -> str:
    """The Markdown report of a sweep, from its result alone."""
    p, m = result.parameters, result.model
    width = f", width {m.width}" if m.width != 1.0 else ""
    out = [f"# Does the CUI curve predict split accuracy? {m.arch}{width} on {p.dataset}", ""]
    out += ["## Verdict", ""] + [f"* {line}" for line in verdict(result)] + [""]
    out += [
        "The claim under test (METHOD.md): the I-SPLIT curve ranks cuts like their measured accuracy after a "
        "bottleneck is inserted and retrained, better than layer size does. The size baseline predicts that a "
        "smaller output is a better cut (predictor: −output bytes). p-values are one-sided permutation tests for a "
        f"positive association: at the {SIGNIFICANCE} level a Spearman ρ must exceed about 0.64 with n = 8 cuts and "
        "about 0.38 with n = 20. One seed, one training budget: treat these as one measurement, not a distribution.",
        "",
    ]
    if plot_name:
        out += [f"![CUI, size and measured accuracy per cut]({plot_name})", ""]
    out += ["## Rank correlation with measured accuracy (all classes)", ""]
    out += ["| predictor | n | Spearman ρ | p (one-sided) | Kendall τ | p (one-sided) |", "|---|---|---|---|---|---|"]
    for key, label in (("cui", "log10 CUI (I-SPLIT)"), ("size", "−output bytes (size)")):
        c = result.correlations[key]
        out.append(
            f"| {label} | {c.n} | {_signed(c.spearman)} | {_num(c.spearman_p)} | {_signed(c.kendall)} | "
            f"{_num(c.kendall_p)} |"
        )
    out += ["", "## Picks", "", "| method | cut | output bytes/img | measured accuracy | below best measured |"]
    out.append("|---|---|---|---|---|")
    for pick in (result.picks.cui, result.picks.size, result.picks.oracle):
        below = (
            f"{100 * (result.picks.oracle.accuracy - pick.accuracy):.1f} pts"
            if pick.accuracy is not None and result.picks.oracle.accuracy is not None
            else "n/a"
        )
        tie = ""
        if pick.tied:
            tie = (
                f" (tied with {', '.join(f'`{t}`' for t in pick.tied)}; mean of the tie {_pct(pick.tie_mean_accuracy)})"
            )
        label = {"cui": "I-SPLIT (max CUI)", "size": "size (smallest output)", "oracle": "best measured"}[pick.method]
        out.append(f"| {label} | `{pick.module}`{tie} | {pick.output_bytes} | {_pct(pick.accuracy)} | {below} |")
    out += ["", "## Per cut (bottleneck trained on all classes)", ""]
    subset_heads = "".join(f" acc. on {{{','.join(map(str, s.classes))}}} |" for s in result.subsets)
    out.append(f"| # | cut | kind | output | bytes/img | code | log10 CUI | accuracy |{subset_heads} train s |")
    out.append("|---" * (9 + len(result.subsets)) + "|")
    for c in result.cuts:
        marks = "".join(
            mark
            for mark, module in (
                (" ★", result.picks.cui.module),
                (" ▼", result.picks.size.module),
                (" ✓", result.picks.oracle.module),
            )
            if c.module == module
        )
        subset_cells = "".join(
            f" {_pct(_subset_accuracy(c.per_class_accuracy, result.test_class_counts, s.classes))} |"
            for s in result.subsets
        )
        out.append(
            f"| {c.position} | `{c.module}`{marks} | {c.kind} | {'×'.join(map(str, c.output_shape))} | {c.output_bytes} | "
            f"{'×'.join(map(str, c.code_shape))} | {c.log10_cui:.3f} | {_pct(c.accuracy)} |{subset_cells} "
            f"{c.training_seconds:.1f} |"
        )
    out += ["", "★ I-SPLIT's pick, ▼ the size baseline's pick, ✓ the best measured cut.", ""]
    if result.subsets:
        out += ["## Class subsets", ""]
        for s in result.subsets:
            label = ", ".join(n if n == str(k) else f"{k} {n}" for k, n in zip(s.classes, s.class_names, strict=True))
            moved = (
                f"moved {'' if s.decisive else 'within a near-tie '}from `{s.all_class_best}` to `{s.best}`"
                if s.best_moved
                else f"stayed at `{s.best}`"
            )
            out += [
                f"### Classes {label} ({s.chosen})",
                "",
                f"Curve from {s.analysis_images} analysed images; predicted best cut {moved} "
                f"(margin {s.margin:+.3f} in log10 CUI); candidates: {', '.join(f'`{c}`' for c in s.candidates)}.",
                "",
                _subset_conclusion(s, result.test_class_counts),
                "",
            ]
            c = s.correlation_all_class_bottlenecks
            out += [
                f"Subset CUI vs subset accuracy of the all-class bottlenecks: Spearman ρ = {_signed(c.spearman)} "
                f"(p = {_num(c.spearman_p)}), Kendall τ = {_signed(c.kendall)} (p = {_num(c.kendall_p)}), n = {c.n}.",
                "",
            ]
            if s.measurements:
                out += [
                    "| cut | log10 CUI (subset) | acc., bottleneck trained on subset | acc., all-class bottleneck | "
                    "train images | train s |",
                    "|---|---|---|---|---|---|",
                ]
                for meas in s.measurements:
                    mark = (
                        " ★"
                        if meas.module == s.best
                        else " (all-class best)"
                        if meas.module == s.all_class_best
                        else ""
                    )
                    out.append(
                        f"| `{meas.module}`{mark} | {meas.log10_cui:.3f} | {_pct(meas.accuracy)} | "
                        f"{_pct(meas.accuracy_all_class_bottleneck)} | {meas.training_images} | "
                        f"{meas.training_seconds:.1f} |"
                    )
                out.append("")
    mc = result.machine
    out += [
        "## Setup",
        "",
        f"* Machine: {mc.platform}, {mc.cpu_count} CPUs ({mc.torch_threads} torch threads), torch {mc.torch}, "
        f"device `{mc.device}` ({mc.device_name}).",
        f"* Started {result.started_at}; wall time {result.wall_seconds:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.phase_seconds.items())
        + ").",
        f"* Model: {m.arch}{width}, {m.input_size} px, {m.in_channels} channel(s), trained {m.epochs} epoch(s) on "
        f"{m.extra.get('train_images', result.train_images)} images "
        f"({f'checkpoint {p.weights}' if p.weights else f'lr {p.lr_model}, batch {p.batch_size_model}'}); "
        f"accuracy without a split {_pct(result.reference_accuracy)} on {result.test_images} test images.",
        f"* Bottleneck at each cut: ratio {p.ratio}, {p.epochs_bottleneck} epoch(s) on {result.bottleneck_images} "
        f"training images (lr {p.lr_bottleneck}, batch {p.batch_size_bottleneck}), original layers frozen; the "
        "same budget at every cut. Subset bottlenecks get as many training images of the subset's classes "
        "(from the whole training split), so the same number of steps; subset accuracy is the 10-way top-1 on the "
        "subset's test images.",
        f"* Importance: {result.curve.num_images} images of the {p.analysis_split} split, target = "
        f"{result.curve.target} (CUI involves no fitting, so sharing the test split with the accuracy measurement "
        "leaks nothing it could learn from).",
        f"* Cuts measured: {len(result.cuts)} of {sum(not q.skipped for q in result.curve.points)} non-skipped "
        f"cut points ({'all' if not (p.cuts or p.max_cuts) else 'given' if p.cuts else f'{p.max_cuts} spanning'})"
        + (
            "; added because a method picks them: "
            + ", ".join(f"`{c.module}`" for c in result.cuts if c.added_for_picks)
            if any(c.added_for_picks for c in result.cuts)
            else ""
        )
        + ".",
    ]
    if result.skipped_for_budget:
        out.append(f"* Skipped for the time budget: {', '.join(result.skipped_for_budget)}.")
    out += [f"* {note}." for note in result.notes]
    out += ["", "Command:", "", "```", result.command, "```", ""]
    return "\n".join(out)


def plot_sweep(result: SweepResult, path: Path) -> Path | None:
    """Write a PNG: the curves with measured accuracy along the network (top), and measured
    accuracy against log10 CUI and against output bytes (bottom). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    active = [i for i, q in enumerate(result.curve.points) if not q.skipped]
    names = [result.curve.points[i].module for i in active]
    x_of = {name: j for j, name in enumerate(names)}
    fig = plt.figure(figsize=(max(11, 0.42 * len(active)), 9.8))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
    top = fig.add_subplot(grid[0, :])
    top.plot(
        range(len(active)),
        [result.curve.points[i].log10_cui for i in active],
        "-o",
        ms=3,
        label="log10 CUI, all classes",
    )
    colours = ["tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for s, colour in zip(result.subsets, itertools.cycle(colours)):
        top.plot(range(len(active)), [s.log10_cui[i] for i in active], "--", color=colour, lw=1,
                 label=f"log10 CUI, classes {s.classes}")  # fmt: skip
    top.set_xticks(range(len(active)), names, rotation=70, fontsize=7)
    top.set_ylabel("log10 CUI")
    shown = [v for i in active for v in (result.curve.points[i].log10_cui, *(s.log10_cui[i] for s in result.subsets))]
    finite = [v for v in shown if v > LOG10_FLOOR]
    if finite and len(finite) < len(shown):  # a zero CUI (the floor) would squash the curves: clip it
        top.set_ylim(min(finite) - 0.5, max(finite) + 0.3)
    acc_ax = top.twinx()
    acc_ax.plot([x_of[c.module] for c in result.cuts], [100 * c.accuracy for c in result.cuts], "ks", ms=6,
                label="measured accuracy, all classes")  # fmt: skip
    for s, colour in zip(result.subsets, itertools.cycle(colours)):
        acc_ax.plot([x_of[m.module] for m in s.measurements], [100 * m.accuracy for m in s.measurements], "D",
                    color=colour, ms=6, mfc="none", label=f"measured, bottleneck on {s.classes}")  # fmt: skip
    for pick, marker in ((result.picks.cui, "*"), (result.picks.size, "v")):
        if pick.accuracy is not None:
            acc_ax.plot(x_of[pick.module], 100 * pick.accuracy, marker, color="tab:red", ms=14, mfc="none",
                        label=f"{pick.method} pick: {pick.module}")  # fmt: skip
    acc_ax.set_ylabel("test accuracy (%)")
    lines = top.get_legend_handles_labels()
    acc_lines = acc_ax.get_legend_handles_labels()
    top.legend(
        lines[0] + acc_lines[0], lines[1] + acc_lines[1], fontsize=7, loc="lower center",
        bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False,
    )  # fmt: skip
    width = f" (width {result.model.width})" if result.model.width != 1.0 else ""
    fig.suptitle(
        f"{result.model.arch}{width} on {result.parameters.dataset}: predicted (CUI) and measured accuracy per cut"
    )
    for k, (key, xs, xlabel) in enumerate(
        (
            ("cui", [c.log10_cui for c in result.cuts], "log10 CUI (I-SPLIT prediction)"),
            ("size", [math.log10(c.output_bytes) for c in result.cuts], "log10 output bytes (size: smaller = better)"),
        )
    ):
        ax = fig.add_subplot(grid[1, k])
        ax.plot(xs, [100 * c.accuracy for c in result.cuts], "o", color="tab:blue" if key == "cui" else "gray")
        for x, c in zip(xs, result.cuts, strict=True):
            ax.annotate(c.module, (x, 100 * c.accuracy), fontsize=6, xytext=(3, 2), textcoords="offset points")
        corr = result.correlations[key]
        ax.set_title(f"ρ = {_signed(corr.spearman, 2)}, τ = {_signed(corr.kendall, 2)}, n = {corr.n}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("measured test accuracy (%)")
        if key == "size":
            ax.invert_xaxis()  # the baseline's "better" to the right, as for CUI
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def output_paths(out: Path, prefix: str = "") -> dict[str, Path]:
    """Where a sweep's files go: ``{out}/{prefix}result.json``, ``report.md``, ``sweep.png``."""
    return {
        "result": out / f"{prefix}result.json",
        "report": out / f"{prefix}report.md",
        "plot": out / f"{prefix}sweep.png",
    }


def write_outputs(result: SweepResult, out: Path, prefix: str = "") -> dict[str, Path]:
    """Write the result JSON, then the plot and report generated from it; returns what was written."""
    paths = output_paths(out, prefix)
    out.mkdir(parents=True, exist_ok=True)
    paths["result"].write_text(result.model_dump_json(indent=1, by_alias=True) + "\n")
    return {"result": paths["result"], **write_report(paths["result"], out, prefix)}


def read_result(path: Path) -> SweepResult:
    """Load and validate a sweep's ``result.json``."""
    if not path.is_file():
        raise IsplitError(f"result file {path} does not exist")
    try:
        return SweepResult.model_validate_json(path.read_text())
    except ValueError as exc:
        raise IsplitError(f"{path} is not a sweep result: {' '.join(str(exc).split())[:300]}") from exc


def write_report(result_path: Path, out: Path | None = None, prefix: str | None = None) -> dict[str, Path]:
    """Generate the plot and Markdown report from a result JSON (beside it by default)."""
    result = read_result(result_path)
    out = out or result_path.parent
    if prefix is None:
        prefix = result_path.name.removesuffix("result.json") if result_path.name.endswith("result.json") else ""
    paths = output_paths(out, prefix)
    written: dict[str, Path] = {}
    plot = plot_sweep(result, paths["plot"])
    if plot is not None:
        written["plot"] = plot
    paths["report"].write_text(render_report(result, paths["plot"].name if plot is not None else None))
    written["report"] = paths["report"]
    return written


# -- command line ---------------------------------------------------------------------------


def _subsets_arg(text: str) -> list[list[str]]:
    groups = [[t.strip() for t in g.split(",") if t.strip()] for g in text.split(";")]
    groups = [g for g in groups if g]
    if not groups:
        raise argparse.ArgumentTypeError(f"no class subset in {text!r}; write e.g. '0,1;5,7,9'")
    return groups


def _csv_arg(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="e.g. vgg16, vgg16_bn, resnet50 (see `isplit zoo list`)")
    p.add_argument("--width", type=float, help="VGG channel multiplier (default: 1.0, or the checkpoint's)")
    p.add_argument("--dataset", required=True, help=DATASETS_HELP)
    p.add_argument("--input-size", type=int, help="pixels, square (default: 32, or the checkpoint's)")
    p.add_argument("--weights", help="an existing checkpoint (`isplit zoo train`) instead of training one")
    p.add_argument("--save-weights", help="where to save the trained reference model (default: OUT/PREFIXmodel.pt)")
    p.add_argument("--no-save-weights", action="store_true", help="do not save the trained reference model")
    p.add_argument("--epochs-model", type=int, default=2)
    p.add_argument("--lr-model", type=float, default=2e-3)
    p.add_argument("--batch-size-model", type=int, default=128)
    p.add_argument("--max-train-images", type=int, help="images to train the model on (default: all)")
    p.add_argument("--epochs-bottleneck", type=int, default=1, help="the same at every cut")
    p.add_argument("--lr-bottleneck", type=float, default=5e-3, help="peak of the one-cycle schedule")
    p.add_argument("--batch-size-bottleneck", type=int, default=64)
    p.add_argument("--bottleneck-images", type=int, help="training images per bottleneck (default: the model's)")
    p.add_argument("--ratio", type=int, default=4, help="bottleneck channel compression ratio")
    p.add_argument("--max-test-images", type=int, default=2000, help="test images measured at each cut")
    p.add_argument("--analysis-images", type=int, default=1000, help="images the importance engine analyses")
    p.add_argument("--analysis-split", choices=["train", "test"], default="test")
    p.add_argument("--target", choices=["label", "predicted"], default="label")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--cuts", type=_csv_arg, help="comma-separated cut modules to measure")
    which.add_argument("--max-cuts", type=int, help="measure N cuts evenly spanning the non-skipped ones")
    p.add_argument("--subsets", type=_subsets_arg, help="class subsets, e.g. '0,1;5,7,9' (default: searched)")
    p.add_argument("--num-subsets", type=int, default=2, help="subsets to search for when --subsets is not given")
    p.add_argument("--subset-cuts", type=int, default=4, help="cuts retrained on each subset's images")
    p.add_argument(
        "--min-margin", type=float, default=0.05, help="log10 CUI by which a subset's best must win to count as moved"
    )
    p.add_argument(
        "--time-budget", type=float, help="seconds for the whole sweep; retraining that would overrun is skipped"
    )
    p.add_argument("--permutations", type=int, default=10000, help="Monte Carlo draws for p-values (n > 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prefix", default="", help="file name prefix, e.g. 'vgg16-fmnist-'")
    p.add_argument("--name", help="a name for the run (default: the output directory's name)")
    p.add_argument("--note", action="append", default=[], help="a remark recorded in the result (repeatable)")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        arch=args.arch,
        width=args.width,
        dataset=args.dataset,
        input_size=args.input_size,
        weights=args.weights,
        epochs_model=args.epochs_model,
        lr_model=args.lr_model,
        batch_size_model=args.batch_size_model,
        max_train_images=args.max_train_images,
        epochs_bottleneck=args.epochs_bottleneck,
        lr_bottleneck=args.lr_bottleneck,
        batch_size_bottleneck=args.batch_size_bottleneck,
        bottleneck_images=args.bottleneck_images,
        ratio=args.ratio,
        max_test_images=args.max_test_images,
        analysis_images=args.analysis_images,
        analysis_split=args.analysis_split,
        target=args.target,
        cuts=args.cuts,
        max_cuts=args.max_cuts,
        subsets=[[int(c) if c.isdigit() else c for c in g] for g in args.subsets] if args.subsets else None,
        num_subsets=args.num_subsets,
        min_margin=args.min_margin,
        subset_cuts=args.subset_cuts,
        time_budget_s=args.time_budget,
        permutations=args.permutations,
        device=args.device,
        seed=args.seed,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out)
    save = None if args.no_save_weights or args.weights else Path(args.save_weights or out / f"{args.prefix}model.pt")
    result = run_sweep(cfg, name=args.name or out.name, save_weights=save, notes=args.note)
    paths = write_outputs(result, out, args.prefix)
    cui, size = result.correlations["cui"], result.correlations["size"]
    print(f"measured {len(result.cuts)} cuts in {result.wall_seconds:.0f} s on {result.machine.device_name}")
    print(
        f"CUI:  Spearman {_signed(cui.spearman)} (p {_num(cui.spearman_p)}), Kendall {_signed(cui.kendall)}, n {cui.n}"
    )
    print(f"size: Spearman {_signed(size.spearman)} (p {_num(size.spearman_p)}), Kendall {_signed(size.kendall)}")
    for pick in (result.picks.cui, result.picks.size, result.picks.oracle):
        print(f"{pick.method:>6} pick: {pick.module:<20} accuracy {_pct(pick.accuracy)}")
    if save is not None:
        print(f"wrote {save}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    paths = write_report(Path(args.result), Path(args.out) if args.out else None, args.prefix)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``experiment sweep`` and ``experiment report`` to the ``isplit`` CLI."""
    exp = subparsers.add_parser("experiment", help="re-measure I-SPLIT's claim: does CUI predict split accuracy?")
    _add_commands(exp.add_subparsers(dest="experiment_command", required=True))


def _add_commands(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="train bottlenecks at many cuts; correlate accuracy with CUI and size")
    add_sweep_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)
    rep = sub.add_parser("report", help="regenerate the Markdown report and plot from a result JSON")
    rep.add_argument("result", help="a sweep's result.json")
    rep.add_argument("--out", help="output directory (default: beside the JSON)")
    rep.add_argument("--prefix", help="file name prefix (default: taken from the JSON's name)")
    rep.set_defaults(func=cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isplit.experiment sweep|report ...``: the same commands without the rest of the CLI
    (for machines that have only this module's dependencies)."""
    parser = argparse.ArgumentParser(prog="python -m isplit.experiment")
    _add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except IsplitError as exc:
        print(f"isplit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
