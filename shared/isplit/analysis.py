"""One analysis run, as the CLI and the analyzer service both perform it: load the model and
data, run the importance engine, write ``result.json`` and the plots."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from isplit import IsplitError
from isplit.checkpoint import ModelInfo, load_model
from isplit.data import DatasetRef, resolve_classes
from isplit.exported import with_dataset_names
from isplit.importance import ImportanceCurve, Target, importance_curve
from isplit.messages import BottleneckSpec, DatasetSpec, ModelSpec, SplitCandidate, candidate_id_for
from isplit.plan import CostProfile, Deployment, cut_costs, plan_analysis
from isplit.plots import plot_class_heat, plot_curve
from isplit.training import pick_device


class AnalysisResult(BaseModel):
    """What an analysis produces (``result.json``). ``costs`` is the cost profile of every cut
    point (``isplit.plan``); None in results written before it existed."""

    model: ModelInfo
    dataset: str
    split: str
    classes: list[int] | None
    class_names: list[str]
    curve: ImportanceCurve
    ranking: list[str]
    seconds: float
    images_per_second: float
    device: str
    costs: CostProfile | None = None


def run_analysis(
    weights: Path,
    dataset: str | DatasetRef,
    *,
    arch: str | None = None,
    classes: Sequence[str | int] | None = None,
    max_images: int | None = 1000,
    batch_size: int = 64,
    target: Target = "label",
    device: str | None = None,
    split: str = "test",
    progress: bool | Callable[[int], None] = False,
    model_meta: Any = None,
) -> AnalysisResult:
    """Analyse the checkpoint ``weights`` on ``dataset`` (a spec string or a parsed reference).

    ``classes`` are indices or names (None = all); ``max_images`` caps the analysed images
    (a stratified, seeded slice); errors a user can cause raise ``IsplitError``. ``model_meta``
    gives a torch.export program's class names and normalisation (``isplit.exported``); a
    program without class names takes the dataset's.
    """
    ref, spec = (dataset, dataset.spec) if isinstance(dataset, DatasetRef) else (DatasetRef.parse(dataset), dataset)
    model, info = load_model(weights, arch=arch, meta=model_meta)
    data = ref.load(split, in_channels=info.in_channels)
    if data.in_channels != info.in_channels:
        raise IsplitError(f"dataset {spec!r} has {data.in_channels} channels, the model expects {info.in_channels}")
    if len(data.class_names) != info.num_classes:
        raise IsplitError(
            f"dataset {spec!r} has {len(data.class_names)} classes, the model was trained on {info.num_classes}"
        )
    info = with_dataset_names(info, data.class_names)
    subset = resolve_classes(classes, data.class_names)
    data = data.subset(subset, max_images)
    dev = pick_device(device)
    start = time.perf_counter()
    curve = importance_curve(
        model,
        data.batches(batch_size, input_size=info.input_size, mean=info.mean, std=info.std),
        target=target,
        batch_size=batch_size,
        device=dev,
        classes=subset,
        progress=progress,
        total=len(data),
    )
    seconds = time.perf_counter() - start
    costs = cut_costs(model, (info.in_channels, info.input_size, info.input_size), curve.points)
    return AnalysisResult(
        model=info,
        dataset=spec,
        split=split,
        classes=subset,
        class_names=data.class_names,
        curve=curve,
        ranking=curve.ranking(),
        seconds=seconds,
        images_per_second=curve.num_images / max(seconds, 1e-9),
        device=str(dev),
        costs=costs,
    )


def load_result(folder: Path) -> AnalysisResult:
    """Read ``folder/result.json`` (an ``isplit analyze`` output); ``IsplitError`` if it is not one."""
    path = Path(folder) / "result.json"
    try:
        return AnalysisResult.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise IsplitError(f"{folder} holds no result.json (give an `isplit analyze --out` folder)") from None
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        first = str(exc).splitlines()[0:3]
        raise IsplitError(f"{path} is not an isplit analysis result: {' '.join(first)}") from None


def split_candidates(
    result: AnalysisResult,
    analysis_id: str,
    *,
    model: ModelSpec,
    dataset: DatasetSpec,
    bottleneck: BottleneckSpec,
    top_k: int,
    deployment: Deployment | None = None,
) -> list[SplitCandidate]:
    """The cuts to retrain: the first ``top_k`` of the ranking (recommended cut first), each as
    the message the trainer consumes, ``predicted_rank`` 1 for the first. With a
    ``deployment`` only cuts its plan finds feasible, best first (``Plan.feasible_ranking``)."""
    curve = result.curve
    ranking = result.ranking if deployment is None else plan_analysis(result, deployment).feasible_ranking()
    candidates = []
    for rank, cut in enumerate(ranking[:top_k], start=1):
        point = curve.point(cut)
        candidates.append(
            SplitCandidate(
                analysis_id=analysis_id,
                candidate_id=candidate_id_for(analysis_id, cut),
                model=model,
                dataset=dataset,
                cut=cut,
                predicted_rank=rank,
                cui=point.cui,
                log10_cui=point.log10_cui,
                size_rank=curve.size_ranking.index(cut) + 1,
                output_shape=point.output_shape,
                output_bytes=point.output_bytes,
                target=curve.target,
                bottleneck=bottleneck,
            )
        )
    return candidates


def write_report(result: AnalysisResult, out: Path) -> dict[str, Path]:
    """Write ``result.json``, ``curve.png`` and ``classes.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"result": out / "result.json", "curve": out / "curve.png", "classes": out / "classes.png"}
    paths["result"].write_text(json.dumps(result.model_dump(mode="json"), indent=1))
    plot_curve(result.curve, paths["curve"], title=f"{result.model.arch} on {result.dataset}")
    plot_class_heat(result.curve, result.class_names, paths["classes"])
    return paths
