"""Process one candidate: retrain, measure, export head and tail, package and register the tail.

Idempotent by candidate id: everything lives under ``<artifact_root>/candidates/<id>/`` and
``result.json`` is written last; a candidate whose result exists is answered from it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from isplit import IsplitError, wire
from isplit import torchserve as ts
from isplit.checkpoint import load_model
from isplit.data import DatasetRef
from isplit.export import export_pair
from isplit.exported import with_dataset_names
from isplit.messages import MessageError, SplitCandidate, TrainingResult, resolve_under
from isplit.retrain import retrain_split, training_result
from isplit.training import pick_device
from isplit_trainer import metrics
from isplit_trainer.config import Settings

log = logging.getLogger("isplit.trainer.pipeline")


class CandidateError(Exception):
    """The candidate itself cannot be trained (missing weights, unknown cut...): dead-letter it."""


def candidate_dir(settings: Settings, candidate_id: str) -> Path:
    return settings.artifact_root / "candidates" / candidate_id


def model_name_for(candidate: SplitCandidate) -> str:
    """TorchServe model name ``isplit-<analysis>-<cut>`` (the candidate id is analysis + cut)."""
    return f"isplit-{candidate.candidate_id}"


def existing_result(settings: Settings, candidate_id: str) -> TrainingResult | None:
    path = candidate_dir(settings, candidate_id) / "result.json"
    if path.exists():
        return TrainingResult.model_validate_json(path.read_text())
    return None


def write_result(settings: Settings, result: TrainingResult) -> None:
    """Write the candidate's ``result.json`` atomically (it marks the candidate done)."""
    out = candidate_dir(settings, result.candidate_id)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(result.model_dump_json(indent=1))
    os.replace(tmp, out / "result.json")


def train_candidate(
    candidate: SplitCandidate,
    settings: Settings,
    should_stop: Callable[[], bool] | None = None,
    *,
    register: bool = True,
) -> TrainingResult:
    """Retrain, export, register; write and return the ``TrainingResult`` (raises ``Abandoned``).

    ``register=False`` (a training Job, which reaches nothing but the artifact volume) stops
    after the export; the trainer that started the Job registers with :func:`register_result`.
    """
    # Paths in a message are untrusted: weights under the artifact root, image folders under
    # the data root, whatever the analyzer checked before publishing.
    try:
        weights = resolve_under(settings.artifact_root, candidate.model.weights_uri, "weights")
        dataset = DatasetRef.parse(candidate.dataset.name, root=settings.data_root)
    except (MessageError, IsplitError) as exc:
        raise CandidateError(str(exc)) from exc
    if not weights.is_file():
        raise CandidateError(f"weights {candidate.model.weights_uri!r} not found under the artifact root")
    out = candidate_dir(settings, candidate.candidate_id)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model, info = load_model(weights, arch=candidate.model.arch)
        train = dataset.load("train", in_channels=info.in_channels)
        test = dataset.load("test", in_channels=info.in_channels)
    except IsplitError as exc:
        raise CandidateError(str(exc)) from exc
    info = with_dataset_names(info, train.class_names)
    cap = candidate.dataset.max_train_images or settings.trainer_max_train_images
    if cap:
        train = train.subset(None, cap)
    if candidate.dataset.max_test_images:
        test = test.subset(None, candidate.dataset.max_test_images)
    device = pick_device(settings.trainer_device)

    def on_step(epoch: int, loss: float, sps: float) -> None:
        metrics.EPOCH.set(epoch)
        metrics.LOSS.set(loss)
        metrics.SAMPLES_PER_SECOND.set(sps)
        if device.type == "cuda":
            metrics.GPU_MEMORY.set(torch.cuda.memory_allocated(device))

    start = time.perf_counter()
    try:
        outcome = retrain_split(
            model,
            info,
            candidate.cut,
            train,
            test,
            candidate.bottleneck,
            classes=candidate.dataset.classes,
            device=device,
            on_step=on_step,
            should_stop=should_stop,
        )
    except IsplitError as exc:
        raise CandidateError(str(exc)) from exc
    model_name = model_name_for(candidate)
    paths = export_pair(
        outcome.pair,
        info,
        out,
        {
            "analysis_id": candidate.analysis_id,
            "candidate_id": candidate.candidate_id,
            "model_name": model_name,
            "dataset": candidate.dataset.name,
        },
    )
    result = training_result(
        candidate,
        outcome,
        head_uri=str(paths["head.pt"].relative_to(settings.artifact_root)),
        model_name=model_name,
        trainer_id=settings.trainer_id,
    )
    if register and settings.torchserve_management_url:
        result = _register(result, paths, model_name, settings)
    metrics.TRAINING_SECONDS.observe(time.perf_counter() - start)
    write_result(settings, result)
    return result


def register_result(result: TrainingResult, settings: Settings) -> TrainingResult:
    """Register the tail of a trained-but-unregistered result (a training Job's) with TorchServe;
    write and return the updated result. Results already registered, or failed, come back as is."""
    if result.status != "succeeded" or result.inference_url or not result.head_uri or not result.model_name:
        return result
    if not settings.torchserve_management_url:
        return result
    out = (settings.artifact_root / result.head_uri).parent
    if not out.resolve().is_relative_to(settings.artifact_root.resolve()):
        return result.model_copy(update={"status": "failed", "error": "head_uri is outside the artifact root"})
    paths = {name: out / name for name in ("head.pt", "head.json", "tail.pt", "tail.json")}
    result = _register(result, paths, result.model_name, settings)
    write_result(settings, result)
    return result


def _register(result: TrainingResult, paths: dict[str, Path], model_name: str, settings: Settings) -> TrainingResult:
    store = settings.model_store()
    store.mkdir(parents=True, exist_ok=True)
    try:
        keys = settings.torchserve_keys()
        mar = ts.build_mar(paths["tail.pt"], paths["tail.json"], model_name, "1.0", store)
        head = torch.jit.load(str(paths["head.pt"]))
        meta = json.loads(paths["head.json"].read_text())
        x = torch.zeros(1, meta["in_channels"], meta["input_size"], meta["input_size"])
        with torch.no_grad():
            code = head(x)
        payload = wire.encode(code, "fp16")
        # Batch settings by the tail's cost per image (batching pays only for a costly tail).
        batching = settings.tail_batching(ts.tail_cost_ms(torch.jit.load(str(paths["tail.pt"])), code))
        ts.register(
            settings.torchserve_management_url,
            mar.name,
            model_name,
            batch_size=batching.batch_size,
            max_batch_delay_ms=batching.max_batch_delay_ms,
            initial_workers=batching.workers,
            key=keys.management,
        )
        log.info("registered %s: %s", model_name, batching)
        # Real requests prove the tail answers and measure network + tail latency.
        # The first request warms the new worker up; the second is the steady-state latency
        # the planner uses for the server side.
        ts.predict(settings.torchserve_inference_url, model_name, payload, timeout_s=30, key=keys.inference)
        t0 = time.perf_counter()
        ts.predict(settings.torchserve_inference_url, model_name, payload, timeout_s=30, key=keys.inference)
        latency_ms = (time.perf_counter() - t0) * 1000
    except Exception as exc:  # training succeeded; serving did not: say so in the result
        log.warning("registering %s failed: %s", model_name, exc)
        return result.model_copy(
            update={"status": "failed", "error": f"registering the tail with TorchServe failed: {exc}"}
        )
    return result.model_copy(
        update={
            "tail_mar_uri": str(mar.relative_to(settings.artifact_root))
            if mar.is_relative_to(settings.artifact_root)
            else str(mar),
            "inference_url": ts.inference_url(settings.torchserve_inference_url, model_name),
            "latency_ms": latency_ms,
        }
    )
