"""Sharded analyses: the importance engine's state is additive, so an analysis splits into shards.

``ImportanceStats`` holds per-class running sums of Grad-CAM maps and per-class image counts;
the sums of shards that together cover the analysed selection exactly, once each, are the
sums of the one-piece run. So:

* :func:`shard_bounds` splits a selection of ``total`` images into ``count`` contiguous index
  ranges (deterministic; never overlapping; covering the selection exactly);
* :func:`run_shard` analyses one of them and returns :class:`ShardStats` (the sums plus what
  they belong to: model, data set, target, cut points);
* :func:`save_stats` / :func:`load_stats` write and read one file: a NumPy ``.npz`` of float64
  sums and int64 counts plus a ``meta.json`` entry, read with ``allow_pickle=False`` (a stats
  file cannot execute code);
* :func:`merge` adds shards up after checking that they belong together; the result is the
  whole selection as "shard 0 of 1", which :func:`isplit.analysis.result_from_stats` turns
  into the same ``AnalysisResult`` as a one-piece run.

Equal sums mean equal curves up to float64 summation order, provided every batch sees the
same images: fp32 convolutions of differently sized batches may differ in the last bits
(max-pool ties amplify that), so shard boundaries are multiples of the batch size whenever
that leaves no shard empty.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from isplit import IsplitError
from isplit.checkpoint import ModelInfo, load_model, sha256_file
from isplit.cuts import CutPoint
from isplit.data import DatasetRef, ImageSet, resolve_classes
from isplit.exported import with_dataset_names
from isplit.importance import ImportanceStats, Target, accumulate_importance
from isplit.plan import CostProfile, cut_costs

STATS_FORMAT = "isplit-importance-stats/1"
META_KEY = "meta.json"
COUNTS_KEY = "counts"
SUM_PREFIX = "sum:"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in the pods of an Indexed Job


def shard_bounds(total: int, count: int, index: int, *, align: int = 1) -> tuple[int, int]:
    """The index range ``[start, stop)`` of shard ``index`` of ``count`` over ``total`` images.

    Shards are contiguous. Each holds ``ceil(total / count)`` images rounded up to a multiple
    of ``align`` (the batch size), the last one the rest, so batches fall where they fall in a
    one-piece run; when that alignment would leave a shard empty, the sizes are balanced
    instead (sizes differ by at most one). Raises ``IsplitError`` for impossible requests.
    """
    if count < 1:
        raise IsplitError(f"the number of shards must be >= 1, got {count}")
    if not 0 <= index < count:
        raise IsplitError(f"shard index {index} out of range 0..{count - 1}")
    if total < count:
        raise IsplitError(f"{count} shards for {total} images: every shard needs at least one image")
    size = math.ceil(math.ceil(total / count) / align) * align
    if (count - 1) * size < total:  # aligned shards, the last one possibly shorter
        return min(index * size, total), min((index + 1) * size, total)
    base, extra = divmod(total, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class AnalysisIdentity(BaseModel):
    """What shard statistics belong to: stats with equal identities may be added up.

    ``weights_sha256`` names the model; ``dataset``, ``split``, ``classes`` and ``max_images``
    the selection, ``num_images`` its size; ``batch_size`` fixes the shard boundaries.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights_sha256: str
    arch: str
    dataset: str
    split: str
    classes: list[int] | None
    max_images: int | None
    num_images: int
    batch_size: int


class ShardMeta(BaseModel):
    """The JSON beside the tensors of a stats file. ``index`` of ``count`` is the shard (0 of 1
    for a whole selection); ``seconds`` the engine time, ``load_seconds`` the time to load the
    model and read the images (what every shard pays again), ``device`` where it ran."""

    model_config = ConfigDict(extra="forbid")

    format: str = STATS_FORMAT
    identity: AnalysisIdentity
    index: int
    count: int
    target: Target
    points: list[CutPoint]
    model: ModelInfo
    class_names: list[str]
    costs: CostProfile | None = None
    seconds: float = 0.0
    load_seconds: float = 0.0
    device: str = ""


@dataclass
class ShardStats:
    """The running sums of one shard (``stats``), what they belong to (``meta``) and, when read
    from a file, that file (``source``, for error messages)."""

    stats: ImportanceStats
    meta: ShardMeta
    source: str = ""

    @property
    def name(self) -> str:
        return self.source or f"shard {self.meta.index} of {self.meta.count}"


# -- computing a shard -----------------------------------------------------------------------


@dataclass
class Selection:
    """A loaded model and the images an analysis covers (before sharding)."""

    model: torch.nn.Module
    info: ModelInfo
    spec: str
    data: ImageSet
    classes: list[int] | None


def load_selection(
    weights: Path,
    dataset: str | DatasetRef,
    *,
    arch: str | None = None,
    classes: Sequence[str | int] | None = None,
    max_images: int | None = 1000,
    split: str = "test",
    model_meta: Any = None,
) -> Selection:
    """Load the checkpoint and the analysed images (a stratified, seeded slice of at most
    ``max_images`` of ``classes``); ``IsplitError`` when they do not fit each other."""
    ref, spec = (dataset, dataset.spec) if isinstance(dataset, DatasetRef) else (DatasetRef.parse(dataset), dataset)
    model, info = load_model(weights, arch=arch, meta=model_meta)
    data = ref.load(split, in_channels=info.in_channels)
    if data.in_channels != info.in_channels:
        raise IsplitError(f"dataset {spec!r} has {data.in_channels} channels, the model expects {info.in_channels}")
    if len(data.class_names) != info.num_classes:
        raise IsplitError(
            f"dataset {spec!r} has {len(data.class_names)} classes, the model was trained on {info.num_classes}"
        )
    info = with_dataset_names(info, data.class_names)  # a program uploaded without names
    subset = resolve_classes(classes, data.class_names)
    return Selection(model, info, spec, data.subset(subset, max_images), subset)


def run_shard(
    weights: Path,
    dataset: str | DatasetRef,
    *,
    index: int = 0,
    count: int = 1,
    arch: str | None = None,
    classes: Sequence[str | int] | None = None,
    max_images: int | None = 1000,
    batch_size: int = 64,
    target: Target = "label",
    device: str | torch.device = "cpu",
    split: str = "test",
    progress: bool | Callable[[int], None] = False,
    model_meta: Any = None,
) -> ShardStats:
    """Analyse shard ``index`` of ``count`` of the selection (see :func:`shard_bounds`); 0 of 1
    is the whole selection. ``progress`` gets the images of this shard done so far."""
    t_load = time.perf_counter()
    sel = load_selection(
        weights, dataset, arch=arch, classes=classes, max_images=max_images, split=split, model_meta=model_meta
    )
    load_seconds = time.perf_counter() - t_load
    total = len(sel.data)
    start, stop = shard_bounds(total, count, index, align=batch_size)
    part = ImageSet(sel.data.images[start:stop], sel.data.labels[start:stop], sel.data.class_names)
    info = sel.info
    t0 = time.perf_counter()
    stats = accumulate_importance(
        sel.model,
        part.batches(batch_size, input_size=info.input_size, mean=info.mean, std=info.std),
        target=target,
        batch_size=batch_size,
        device=device,
        classes=sel.classes,
        progress=progress,
        total=len(part),
    )
    seconds = time.perf_counter() - t0
    shape = (info.in_channels, info.input_size, info.input_size)
    identity = AnalysisIdentity(
        weights_sha256=sha256_file(weights),
        arch=info.arch,
        dataset=sel.spec,
        split=split,
        classes=sel.classes,
        max_images=max_images,
        num_images=total,
        batch_size=batch_size,
    )
    meta = ShardMeta(
        identity=identity,
        index=index,
        count=count,
        target=target,
        points=stats.points,
        model=info,
        class_names=sel.data.class_names,
        costs=cut_costs(sel.model, shape, stats.points),
        seconds=seconds,
        load_seconds=load_seconds,
        device=str(device),
    )
    return ShardStats(stats, meta)


def _shard_worker(kwargs: dict, out: str, threads: int) -> str:
    torch.set_num_threads(threads)
    save_stats(run_shard(**kwargs), Path(out))
    return out


def run_shards(weights: Path, dataset: str, *, count: int, folder: Path, **kwargs) -> list[Path]:
    """Run all ``count`` shards at once, each in its own process (the CPU threads shared out),
    writing ``folder/shard-<i>-of-<count>.npz``; their paths in shard order. ``kwargs`` are
    :func:`run_shard`'s keywords."""
    folder.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // count)
    paths = [folder / f"shard-{i}-of-{count}.npz" for i in range(count)]
    with ProcessPoolExecutor(max_workers=count, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(
                _shard_worker,
                {"weights": weights, "dataset": dataset, "index": i, "count": count, **kwargs},
                str(p),
                threads,
            )
            for i, p in enumerate(paths)
        ]
        for future in futures:
            future.result()  # an IsplitError of a shard is raised here, as it was raised there
    return paths


# -- files -----------------------------------------------------------------------------------


def save_stats(shard: ShardStats, path: Path) -> None:
    """Write ``shard`` to ``path`` (``.npz``: ``meta.json`` as UTF-8 bytes, ``counts`` int64
    ``(K,)``, ``sum:<module>`` float64 ``(K, H, W)`` per cut point); atomically (a reader never
    sees half a file)."""
    arrays: dict[str, np.ndarray] = {
        META_KEY: np.frombuffer(shard.meta.model_dump_json().encode("utf-8"), dtype=np.uint8),
        COUNTS_KEY: shard.stats.counts.numpy().astype(np.int64),
    }
    for p in shard.stats.points:
        arrays[SUM_PREFIX + p.module] = shard.stats.sums[p.module].numpy().astype(np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_stats(path: Path) -> ShardStats:
    """Read a stats file written by :func:`save_stats`, checking every array against the meta
    (no pickles are unpickled); ``IsplitError`` naming the file and what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IsplitError(f"cannot read stats file {path}: {exc.strerror or exc}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # not a zip, a pickled array, a corrupt member...
        raise IsplitError(f"{path} is not an isplit stats file: {type(exc).__name__}: {exc}"[:300]) from None
    if META_KEY not in arrays or arrays[META_KEY].dtype != np.uint8:
        raise IsplitError(f"{path} is not an isplit stats file: no {META_KEY}")
    try:
        meta = ShardMeta.model_validate(json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8")))
    except (ValueError, ValidationError) as exc:
        raise IsplitError(f"{path}: bad {META_KEY}: {' '.join(str(exc).split())[:300]}") from None
    if meta.format != STATS_FORMAT:
        raise IsplitError(f"{path}: format {meta.format!r} is not {STATS_FORMAT!r}")
    return ShardStats(_stats_from_arrays(path, meta, arrays), meta, str(path))


def _stats_from_arrays(path: Path, meta: ShardMeta, arrays: dict[str, np.ndarray]) -> ImportanceStats:
    k = meta.model.num_classes
    counts = arrays.pop(COUNTS_KEY, None)
    if counts is None or counts.dtype != np.int64 or counts.shape != (k,) or (counts < 0).any():
        raise IsplitError(f"{path}: '{COUNTS_KEY}' must be {k} non-negative int64 counts")
    if not 0 <= meta.index < meta.count:
        raise IsplitError(f"{path}: shard index {meta.index} out of range 0..{meta.count - 1}")
    ident = meta.identity
    start, stop = shard_bounds(ident.num_images, meta.count, meta.index, align=ident.batch_size)
    if int(counts.sum()) != stop - start:
        raise IsplitError(
            f"{path}: counts add up to {int(counts.sum())} images, shard {meta.index} holds {stop - start}"
        )
    sums = {}
    for p in meta.points:
        h, w = (p.output_shape[1], p.output_shape[2]) if len(p.output_shape) == 3 else (1, 1)
        arr = arrays.pop(SUM_PREFIX + p.module, None)
        if arr is None or arr.dtype != np.float64 or arr.shape != (k, h, w) or not np.isfinite(arr).all():
            raise IsplitError(f"{path}: the sums of cut point {p.module!r} must be finite float64 of shape {(k, h, w)}")
        sums[p.module] = torch.from_numpy(arr)
    if arrays:
        raise IsplitError(f"{path}: unexpected arrays {sorted(arrays)[:3]}")
    return ImportanceStats(list(meta.points), sums, torch.from_numpy(counts), meta.target)


# -- merging ---------------------------------------------------------------------------------


def merge(stats_list: Sequence[ShardStats]) -> ShardStats:
    """Add up the shards of one analysis: the whole selection as shard 0 of 1.

    Every shard must have the same model, data set, selection, target and cut points, and the
    shards must be exactly ``0 .. count-1`` of the same ``count``, each once; otherwise
    ``IsplitError`` naming what differs. ``seconds`` and ``load_seconds`` are the slowest
    shard's (shards run side by side); ``device`` lists the devices used.
    """
    if not stats_list:
        raise IsplitError("no stats to merge")
    first = stats_list[0]
    m0 = first.meta
    for other in stats_list[1:]:
        _check_same(first, other)
    indices = sorted(s.meta.index for s in stats_list)
    if indices != list(range(m0.count)):
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        missing = sorted(set(range(m0.count)) - set(indices))
        problems = [f"shard {i} given {indices.count(i)} times" for i in dupes]
        problems += [f"shard {i} of {m0.count} missing" for i in missing]
        raise IsplitError("the stats do not cover the selection exactly once: " + "; ".join(problems))
    sums = {p.module: sum(s.stats.sums[p.module] for s in stats_list) for p in m0.points}
    counts = sum(s.stats.counts for s in stats_list)
    devices = sorted({s.meta.device for s in stats_list})
    meta = m0.model_copy(
        update={
            "index": 0,
            "count": 1,
            "seconds": max(s.meta.seconds for s in stats_list),
            "load_seconds": max(s.meta.load_seconds for s in stats_list),
            "device": ",".join(devices),
        }
    )
    return ShardStats(ImportanceStats(list(m0.points), sums, counts, m0.target), meta)  # type: ignore[arg-type]


def _check_same(a: ShardStats, b: ShardStats) -> None:
    ma, mb = a.meta, b.meta
    pairs = [(f"identity.{k}", getattr(ma.identity, k), getattr(mb.identity, k)) for k in AnalysisIdentity.model_fields]
    pairs += [("target", ma.target, mb.target), ("number of shards", ma.count, mb.count)]
    for field, va, vb in pairs:
        if va != vb:
            raise IsplitError(f"cannot merge {a.name} and {b.name}: {field} differs ({va!r} vs {vb!r})")
    if ma.points != mb.points:
        diff = next(
            (f"{pa.module} vs {pb.module}" for pa, pb in zip(ma.points, mb.points, strict=False) if pa != pb),
            f"{len(ma.points)} vs {len(mb.points)} points",
        )
        raise IsplitError(f"cannot merge {a.name} and {b.name}: the cut points differ ({diff})")
