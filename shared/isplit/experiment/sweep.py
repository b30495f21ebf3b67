"""Running a sweep: train or load the reference model, one importance pass, a bottleneck at
every measured cut (and per class subset) within the time budget, then the claim's numbers."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from isplit import IsplitError
from isplit.checkpoint import ModelInfo, load_model, save_checkpoint
from isplit.cuts import find_cut_points
from isplit.data import ImageSet, load_dataset, resolve_classes
from isplit.experiment.claims import (
    best_margin,
    budget_modules,
    budget_picks,
    choose_cuts,
    correlate,
    evaluate_claim,
    partial_correlations,
    size_control,
    size_pick,
    spanning_order,
    subset_accuracy,
    subset_search,
)
from isplit.experiment.schema import (
    CutMeasurement,
    Machine,
    SubsetCutMeasurement,
    SubsetResult,
    SweepConfig,
    SweepResult,
)
from isplit.exported import with_dataset_names
from isplit.importance import (
    ImportanceCurve,
    ImportanceStats,
    Target,
    accumulate_importance,
    curve_from_stats,
)
from isplit.plan.costs import cut_costs
from isplit.retrain import RetrainOutcome, retrain_split
from isplit.training import evaluate, pick_device, seed_everything, train_reference_model
from isplit.zoo import build_model


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
    info = with_dataset_names(info, train.class_names)
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
    if cfg.seeds < 1:
        raise IsplitError(f"seeds must be >= 1, got {cfg.seeds}")
    bad = [b for b in cfg.budgets if not 0 < b <= 1]
    if bad:
        raise IsplitError(f"each budget is a fraction of the network's FLOPs in (0, 1], got {bad[0]}")
    if cfg.time_budget_s is not None and cfg.time_budget_s <= 0:
        raise IsplitError(f"time-budget must be > 0 seconds, got {cfg.time_budget_s}")


# What may differ between a sweep and the earlier run it resumes: nothing that changes a measurement.
RESUME_MAY_DIFFER = {"time_budget_s", "device", "cuts", "max_cuts", "permutations"}


def _resumable_cuts(cfg: SweepConfig, resume: SweepResult | None) -> dict[str, CutMeasurement]:
    """The earlier run's cut measurements by module, after checking it measured the same way."""
    if resume is None:
        return {}
    before = resume.parameters.model_dump()
    now = cfg.model_dump()
    differ = sorted(k for k in now if k not in RESUME_MAY_DIFFER and now[k] != before.get(k))
    if differ:
        shown = ", ".join(f"{k} {before.get(k)!r} -> {now[k]!r}" for k in differ[:5])
        raise IsplitError(f"cannot resume: the earlier run measured differently ({shown})")
    return {c.module: c for c in resume.cuts}


def run_sweep(
    cfg: SweepConfig,
    *,
    name: str = "sweep",
    save_weights: Path | None = None,
    command: str | None = None,
    notes: Sequence[str] = (),
    progress: bool = True,
    resume: SweepResult | None = None,
) -> SweepResult:
    """Run the whole sweep described by ``cfg`` (see the module docstring); returns the result.

    ``save_weights`` is where a freshly trained reference model is saved (None: not saved);
    ``command`` is recorded as the exact command line (default: this process's argv);
    ``notes`` are recorded and printed in the report. ``resume``: an earlier result of the same
    sweep (same model checkpoint and measurement settings; budget, device and cut selection may
    differ): its measured cuts are kept and only the others are trained, so several budgeted
    runs add up to the whole network.
    """
    _check_config(cfg)
    if resume is not None and not cfg.weights:
        raise IsplitError("--resume needs --weights: the earlier run's cuts belong to that checkpoint")
    if not cfg.weights:
        cfg = cfg.model_copy(update={"width": cfg.width or 1.0, "input_size": cfg.input_size or 64})
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
    reused = _resumable_cuts(cfg, resume)  # with the checkpoint's width and input size filled in

    phase = time.perf_counter()
    source = full_train if cfg.analysis_split == "train" else full_test
    analysed = source.subset(None, cfg.analysis_images)

    def importance(target: Target) -> ImportanceStats:
        return accumulate_importance(
            model,
            analysed.batches(64, input_size=info.input_size, mean=info.mean, std=info.std),
            target=target,
            device=device,
            progress=progress,
            total=len(analysed),
        )

    stats = importance(cfg.target)
    curve = curve_from_stats(stats)
    other_curve = curve_from_stats(importance("predicted" if cfg.target == "label" else "label"))
    if subsets_given is not None:
        subset_curves = [(s, curve_from_stats(stats, s)) for s in subsets_given]
    else:
        subset_curves = subset_search(stats, curve.best, count=cfg.num_subsets, min_margin=cfg.min_margin)
    phases["importance"] = time.perf_counter() - phase

    active = [p for p in curve.points if not p.skipped]
    position = {p.module: i for i, p in enumerate(active)}
    costs = cut_costs(model, (info.in_channels, info.input_size, info.input_size), curve.points)
    fractions = {c.module: c.head_flops_fraction for c in costs.cuts}
    requested = choose_cuts([p.module for p in active], cfg.cuts, cfg.max_cuts)
    size_module, _ = size_pick(curve)
    picked = [curve.best, size_module, *budget_modules([curve, other_curve], fractions, cfg.budgets)]
    forced = [m for m in dict.fromkeys(picked) if m not in requested]
    ordered = forced + [requested[i] for i in spanning_order(len(requested))]

    budget = _Budget(t0, cfg.time_budget_s)
    skipped: list[str] = []
    bench = SweepBench(model, info, cfg, device, curve, test, budget, skipped)
    cuts: list[CutMeasurement] = []
    phase = time.perf_counter()
    bar = tqdm(ordered, desc="cuts (all classes)", unit="cut", disable=not progress)
    for module in bar:
        if module in reused:
            cuts.append(reused[module])
            continue
        if not budget.allows():
            skipped.append(module)
            continue
        bar.set_postfix(cut=module)
        job = time.perf_counter()
        cuts.append(_measure_cut(bench, module, fit, position[module], fractions[module], forced=module in forced))
        budget.record(time.perf_counter() - job)
        tqdm.write(f"  {module:<24} log10 CUI {cuts[-1].log10_cui:8.3f}  accuracy {cuts[-1].accuracy:.4f}")
    bar.close()
    cuts.sort(key=lambda c: c.position)
    phases["retrain_all_classes"] = time.perf_counter() - phase

    test_counts = torch.bincount(test.labels, minlength=len(class_names)).tolist()
    phase = time.perf_counter()
    subsets = [
        _measure_subset(
            bench,
            classes,
            sub_curve,
            cuts,
            full_train,
            len(fit),
            test_counts,
            chosen="given" if subsets_given is not None else "auto",
            progress=progress,
        )  # fmt: skip
        for classes, sub_curve in subset_curves
    ]
    phases["retrain_subsets"] = time.perf_counter() - phase

    correlations, picks = evaluate_claim(curve, cuts, permutations=cfg.permutations, seed=cfg.seed)
    for pick in (picks.cui, picks.size, picks.oracle):
        pick.head_flops_fraction = fractions[pick.module]
    if resume is not None:
        kept = sum(1 for c in cuts if c.module in reused)
        notes.append(f"resumed from the run started {resume.started_at}: {kept} cut(s) measured there were kept")
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
        budget_picks=budget_picks([curve, other_curve], cuts, fractions, cfg.budgets),
        partial_correlations=partial_correlations(cuts, permutations=cfg.permutations, seed=cfg.seed),
        other_curve=other_curve,
        head_flops_fraction={k: round(v, 6) for k, v in fractions.items()},
        subsets=subsets,
        skipped_for_budget=skipped,
        notes=notes,
    )


def _command_line() -> str:
    """This process's command line as a user would type it."""
    if sys.argv and Path(sys.argv[0]).parent.name == "experiment":  # python -m isplit.experiment
        return shlex.join(["python", "-m", "isplit.experiment", *sys.argv[1:]])
    return shlex.join(["isplit", *sys.argv[1:]])


@dataclass
class SweepBench:
    """What every measurement of one sweep shares: the reference model, the parameters, the
    all-class curve, the test images, the time budget and the list of what it skipped."""

    model: nn.Module
    info: ModelInfo
    cfg: SweepConfig
    device: torch.device
    curve: ImportanceCurve
    test: ImageSet
    budget: _Budget
    skipped: list[str]


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _retrain_seeds(bench: SweepBench, module: str, fit: ImageSet, test: ImageSet, classes: list[int] | None = None):
    """The bottleneck at ``module`` trained once per seed of the sweep: the outcomes, in seed order."""
    return [
        retrain_split(bench.model, bench.info, module, fit, test, spec, classes=classes, device=bench.device)
        for spec in bench.cfg.bottleneck_seeds()
    ]


def _measure_cut(
    bench: SweepBench, module: str, fit: ImageSet, position: int, head_fraction: float, *, forced: bool
) -> CutMeasurement:
    info, test, device, curve = bench.info, bench.test, bench.device, bench.curve
    outcomes: list[RetrainOutcome] = _retrain_seeds(bench, module, fit, test)
    per_class = [
        per_class_accuracy(nn.Sequential(o.pair.head, o.pair.tail).eval(), test, info, device) for o in outcomes
    ]
    accuracies = [o.accuracy_split for o in outcomes]
    mean, sd = mean_sd(accuracies)
    point = curve.point(module)
    return CutMeasurement(
        module=module,
        kind=point.kind,
        position=position,
        output_shape=point.output_shape,
        output_bytes=point.output_bytes,
        code_shape=outcomes[0].pair.code_shape,
        log10_cui=point.log10_cui,
        accuracy=mean,
        per_class_accuracy=[
            None if any(v is None for v in vals) else sum(vals) / len(vals)  # type: ignore[misc, arg-type]
            for vals in zip(*per_class, strict=True)
        ],
        training_seconds=sum(o.training_seconds for o in outcomes),
        added_for_picks=forced,
        accuracies=accuracies,
        accuracy_sd=sd,
        head_flops_fraction=head_fraction,
    )


def _measure_subset(
    bench: SweepBench,
    classes: list[int],
    sub_curve: ImportanceCurve,
    all_cuts: list[CutMeasurement],
    pool: ImageSet,
    fit_size: int,
    test_counts: list[int],
    *,
    chosen: Literal["given", "auto"],
    progress: bool,
) -> SubsetResult:
    """Bottlenecks trained on a class subset's images (``fit_size`` of ``pool``, as many as an
    all-class bottleneck gets) at a few cuts of the subset's curve, measured on its images."""
    info, cfg, curve, test = bench.info, bench.cfg, bench.curve, bench.test
    budget, skipped = bench.budget, bench.skipped
    from_all = {c.module: subset_accuracy(c.per_class_accuracy, test_counts, classes) for c in all_cuts}
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
        outcomes = _retrain_seeds(bench, module, fit_subset, test_subset, classes)
        budget.record((time.perf_counter() - job) / max(share, 1e-9))
        accuracies = [o.accuracy_split_subset if o.accuracy_split_subset is not None else 0.0 for o in outcomes]
        mean, sd = mean_sd(accuracies)
        measurements.append(
            SubsetCutMeasurement(
                module=module,
                output_bytes=sub_curve.point(module).output_bytes,
                log10_cui=sub_curve.point(module).log10_cui,
                accuracy=mean,
                accuracy_all_class_bottleneck=from_all.get(module),
                training_images=len(fit_subset),
                training_seconds=sum(o.training_seconds for o in outcomes),
                accuracies=accuracies,
                accuracy_sd=sd,
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
        decisive=sub_curve.best != curve.best and best_margin(sub_curve, curve.best) >= cfg.min_margin,
        margin=best_margin(sub_curve, curve.best),
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
