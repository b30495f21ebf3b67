"""One analysis run, as the CLI and the analyzer service both perform it: load the model and
data, run the importance engine, write ``result.json`` and the plots."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from isplit import IsplitError
from isplit.checkpoint import ModelInfo
from isplit.data import DatasetRef
from isplit.importance import ImportanceCurve, Target, curve_from_stats
from isplit.messages import BottleneckSpec, DatasetSpec, ModelSpec, SplitCandidate, candidate_id_for
from isplit.plan import CostProfile, Deployment, plan_analysis
from isplit.plots import plot_class_heat, plot_curve
from isplit.shards import ShardStats, run_shard
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
    (a stratified, seeded slice); errors a user can cause raise ``IsplitError``. The whole
    selection is one shard (``isplit.shards``): a sharded run merges into the same result.
    ``model_meta`` gives a torch.export program's class names and normalisation
    (``isplit.exported.ProgramMeta``); a program without class names takes the dataset's.
    """
    whole = run_shard(
        weights,
        dataset,
        arch=arch,
        classes=classes,
        max_images=max_images,
        batch_size=batch_size,
        target=target,
        device=pick_device(device),
        split=split,
        progress=progress,
        model_meta=model_meta,
    )
    return result_from_stats(whole)


def result_from_stats(shard: ShardStats) -> AnalysisResult:
    """The ``AnalysisResult`` of a whole selection's stats (a one-piece run, or ``merge``'s)."""
    meta = shard.meta
    if meta.count != 1:
        raise IsplitError(f"{shard.name} is shard {meta.index} of {meta.count}: merge all shards first")
    curve = curve_from_stats(shard.stats, meta.identity.classes)
    return AnalysisResult(
        model=meta.model,
        dataset=meta.identity.dataset,
        split=meta.identity.split,
        classes=meta.identity.classes,
        class_names=meta.class_names,
        curve=curve,
        ranking=curve.ranking(),
        seconds=meta.seconds,
        images_per_second=curve.num_images / max(meta.seconds, 1e-9),
        device=meta.device,
        costs=meta.costs,
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
