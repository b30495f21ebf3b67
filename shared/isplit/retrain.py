"""Retrain a head/tail pair at a cut: insert a bottleneck, train it, measure the split model.

Stage 1 trains the bottleneck with the original layers frozen, matching the original
activation at the cut and the original outputs, plus cross-entropy; stage 2 (optional)
fine-tunes decoder and tail with cross-entropy. CUDA uses bf16 autocast; CPU runs are seeded
and reproducible.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from isplit import IsplitError
from isplit.bottleneck import make_bottleneck
from isplit.checkpoint import ModelInfo
from isplit.cuts import find_cut_points, split_at
from isplit.data import ImageSet
from isplit.messages import BottleneckSpec, SplitCandidate, TrainingResult
from isplit.plan import layer_flops
from isplit.plan.costs import flop_layer_kind
from isplit.training import evaluate, seed_everything
from isplit.wire import payload_nbytes


class Abandoned(Exception):
    """Training was asked to stop (e.g. SIGTERM); nothing was produced."""


class EdgeHead(nn.Module):
    """Runs on the edge: original layers up to the cut, then the encoder. ``(N, C, S, S) -> code``."""

    def __init__(self, head: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        self.head, self.encoder = head, encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.head(x))


class ServerTail(nn.Module):
    """Runs on the server: the decoder, then the original layers after the cut. ``code -> logits``."""

    def __init__(self, decoder: nn.Module, tail: nn.Module) -> None:
        super().__init__()
        self.decoder, self.tail = decoder, tail

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.tail(self.decoder(code))


@dataclass
class HeadTailPair:
    """A trained split: ``tail(head(x))`` approximates the original model."""

    head: EdgeHead
    tail: ServerTail
    cut: str
    code_shape: list[int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))


@dataclass
class RetrainOutcome:
    """Measurements of one retrained split (accuracies in [0, 1], times in seconds)."""

    pair: HeadTailPair
    accuracy_original: float
    accuracy_split: float
    accuracy_original_subset: float | None
    accuracy_split_subset: float | None
    bytes_per_image: dict[str, int]
    head_params: int
    tail_params: int
    head_flops: int
    tail_flops: int
    training_seconds: float
    samples_per_second: float
    losses: list[float] = field(default_factory=list)


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs (``isplit.plan.layer_flops``: 2 x multiply-accumulates of conv,
    transposed conv and linear layers) for one call on ``example``, divided by its batch size
    (FLOPs per image)."""
    total = [0]

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        total[0] += layer_flops(m, inp[0], out)

    handles = [m.register_forward_hook(hook) for m in module.modules() if flop_layer_kind(m) is not None]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return total[0] // max(1, example.shape[0])


CACHE_MEMORY_BYTES = 1 << 30  # activation caches larger than this are memory-mapped files


class ActivationCache:
    """The frozen head's activation at the cut and the frozen model's logits of every training
    image, computed once for all epochs.

    ``acts`` is ``(N, *cut_shape)`` float32, ``logits`` ``(N, K)`` float32, ``labels`` ``(N,)``
    int64, row ``i`` for image ``i`` of the set. Up to ``memory_bytes`` they are held in
    memory; larger caches are float32 files memory-mapped from a temporary directory (the page
    cache holds what fits, the disk the rest), removed by :meth:`close`.
    """

    def __init__(self, labels: torch.Tensor, act_shape: Sequence[int], num_classes: int, memory_bytes: int) -> None:
        n = int(labels.shape[0])
        self.labels = labels
        sizes = {"acts": (n, *act_shape), "logits": (n, num_classes)}
        total = sum(math.prod(s) for s in sizes.values()) * 4
        self._dir = tempfile.TemporaryDirectory(prefix="isplit-acts-") if total > memory_bytes else None
        self.spilled = self._dir is not None
        tensors = {name: self._allocate(name, shape) for name, shape in sizes.items()}
        self.acts, self.logits = tensors["acts"], tensors["logits"]

    def _allocate(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self._dir is None:
            return torch.empty(shape, dtype=torch.float32)
        path = os.path.join(self._dir.name, f"{name}.f32")
        return torch.from_file(path, shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)

    @classmethod
    def fill(
        cls,
        data: ImageSet,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        frozen: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        memory_bytes: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> ActivationCache:
        """Run ``frozen(images) -> (acts, logits)`` over ``batches`` (all of ``data``, in
        order, unshuffled) and keep the outputs."""
        cache: ActivationCache | None = None
        row = 0
        try:
            for x, _ in batches:
                if should_stop is not None and should_stop():
                    raise Abandoned("stopped while caching the head's activations")
                act, logits = frozen(x)
                if cache is None:
                    cache = cls(data.labels, act.shape[1:], logits.shape[1], memory_bytes)
                cache.acts[row : row + len(x)] = act.float().cpu()
                cache.logits[row : row + len(x)] = logits.float().cpu()
                row += len(x)
        except BaseException:
            if cache is not None:
                cache.close()
            raise
        if cache is None or row != len(data):
            raise IsplitError(f"caching activations saw {row} of {len(data)} images")
        return cache

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(acts, logits, labels)`` in the shuffled order of ``ImageSet.batches(shuffle=True,
        seed=seed)``, so cached and uncached training see the same batches."""
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.acts[idx], self.logits[idx], self.labels[idx]

    def close(self) -> None:
        """Drop the tensors and remove the spill directory (if any)."""
        self.acts = self.logits = torch.empty(0)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _frozen_outputs(
    head: nn.Module, tail: nn.Module, x: torch.Tensor, use_amp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's activation at the cut and its logits: ``(head(x), tail(head(x)))``."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        act = head(x)
        return act, tail(act)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def retrain_split(
    model: nn.Module,
    info: ModelInfo,
    cut: str,
    train: ImageSet,
    test: ImageSet,
    budget: BottleneckSpec | None = None,
    *,
    classes: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_step: Callable[[int, float, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache_activations: bool = True,
    cache_memory_bytes: int = CACHE_MEMORY_BYTES,
) -> RetrainOutcome:
    """Insert a bottleneck at ``cut`` of the trained ``model``, train it within ``budget``
    (compression ratio, epochs, learning rate, batch size, tail fine-tuning, seed; the
    defaults of :class:`~isplit.messages.BottleneckSpec` when None), measure.

    ``train``/``test`` hold all classes; with ``classes`` the bottleneck trains on those
    classes' images and subset accuracies are reported too. ``on_step(epoch, loss,
    samples_per_second)`` is called every few batches; ``should_stop()`` returning True
    abandons the work (``Abandoned``).

    The head and the tail's weights are frozen and in eval mode, so the activation at the cut
    and the original logits of an image are the same every epoch: with ``cache_activations``
    they are computed once (:class:`ActivationCache`; in memory up to ``cache_memory_bytes``,
    beyond that in a memory-mapped file) and each step runs only bottleneck and tail.
    ``samples_per_second`` includes the time to fill the cache.
    """
    budget = budget or BottleneckSpec()
    ratio, epochs, lr, batch_size, seed = (
        budget.compression_ratio,
        budget.epochs,
        budget.lr,
        budget.batch_size,
        budget.seed,
    )
    device = torch.device(device)
    seed_everything(seed)
    points = {p.module: p for p in find_cut_points(model, (info.in_channels, info.input_size, info.input_size))}
    if cut not in points:
        raise IsplitError(f"cut {cut!r} is not a cut point of this {info.arch} (see `isplit cuts`)")
    model = model.to(device).eval()
    head, tail = split_at(model, cut)
    bottleneck = make_bottleneck(points[cut].output_shape, ratio).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    fit_set = train.subset(classes) if classes is not None else train
    batches = lambda data, shuffle, s=0: data.batches(  # noqa: E731
        batch_size, input_size=info.input_size, mean=info.mean, std=info.std, shuffle=shuffle, seed=s
    )
    use_amp = device.type == "cuda"
    losses: list[float] = []
    start = time.perf_counter()
    seen = 0
    opt = torch.optim.AdamW(bottleneck.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * ((len(fit_set) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(total=steps, desc=f"bottleneck@{cut}", unit="batch", disable=not progress)
    frozen = lambda x: _frozen_outputs(head, tail, x.to(device), use_amp)  # noqa: E731
    cache = (
        ActivationCache.fill(fit_set, batches(fit_set, False), frozen, cache_memory_bytes, should_stop)
        if cache_activations
        else None
    )
    try:
        for epoch in range(epochs):
            bottleneck.train()
            epoch_batches = (
                cache.batches(batch_size, seed + epoch)
                if cache is not None
                else ((*frozen(x), y) for x, y in batches(fit_set, True, seed + epoch))
            )
            for step, (act, ref_logits, y) in enumerate(epoch_batches):
                if should_stop is not None and should_stop():
                    raise Abandoned(f"stopped during epoch {epoch + 1}")
                act, ref_logits, y = act.to(device), ref_logits.to(device), y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    recon = bottleneck.decoder(bottleneck.encoder(act))
                    logits = tail(recon)
                    loss = (
                        F.mse_loss(recon.float(), act.float()) / act.float().pow(2).mean().clamp_min(1e-6)
                        + F.cross_entropy(logits.float(), y)
                        + F.kl_div(
                            F.log_softmax(logits.float(), 1),
                            F.log_softmax(ref_logits.float(), 1),
                            log_target=True,
                            reduction="batchmean",
                        )
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += int(y.numel())
                losses.append(loss.item())
                bar.update(1)
                if on_step is not None and step % 5 == 0:
                    on_step(epoch + 1, losses[-1], seen / max(time.perf_counter() - start, 1e-9))
    finally:
        if cache is not None:
            cache.close()
    bar.close()
    if budget.finetune_tail:
        _finetune_tail(tail, bottleneck, head, batches(fit_set, True, seed + 99), lr / 10, device, should_stop)
    training_seconds = time.perf_counter() - start
    bottleneck.eval()
    pair = HeadTailPair(EdgeHead(head, bottleneck.encoder), ServerTail(bottleneck.decoder, tail), cut, [])
    example = torch.zeros(2, info.in_channels, info.input_size, info.input_size, device=device)
    with torch.no_grad():
        code = pair.head(example)
    pair.code_shape = list(code.shape[1:])
    split_module = nn.Sequential(pair.head, pair.tail).eval()  # a new Sequential trains; evaluate() would restore that

    def acc(m: nn.Module, data: ImageSet) -> float:
        return evaluate(m, batches(data, False), device)

    subset_test = test.subset(classes) if classes is not None else None
    outcome = RetrainOutcome(
        pair=pair,
        accuracy_original=acc(model, test),
        accuracy_split=acc(split_module, test),
        accuracy_original_subset=acc(model, subset_test) if subset_test is not None else None,
        accuracy_split_subset=acc(split_module, subset_test) if subset_test is not None else None,
        bytes_per_image={enc: payload_nbytes(pair.code_shape, enc) for enc in ("fp32", "fp16", "int8")},
        head_params=_params(pair.head),
        tail_params=_params(pair.tail),
        head_flops=count_flops(pair.head, example),
        tail_flops=count_flops(pair.tail, code),
        training_seconds=training_seconds,
        samples_per_second=seen / max(training_seconds, 1e-9),
        losses=losses,
    )
    return outcome


def training_result(candidate: SplitCandidate, outcome: RetrainOutcome, **fields: Any) -> TrainingResult:
    """The succeeded result of ``candidate`` from what the retrainer measured; ``fields`` are
    the rest of the result (artifact URIs, model name, trainer id)."""
    return TrainingResult(
        analysis_id=candidate.analysis_id,
        candidate_id=candidate.candidate_id,
        cut=candidate.cut,
        status="succeeded",
        accuracy_original=outcome.accuracy_original,
        accuracy_split=outcome.accuracy_split,
        accuracy_original_subset=outcome.accuracy_original_subset,
        accuracy_split_subset=outcome.accuracy_split_subset,
        bytes_per_image=outcome.bytes_per_image,
        head_params=outcome.head_params,
        tail_params=outcome.tail_params,
        head_flops=outcome.head_flops,
        tail_flops=outcome.tail_flops,
        training_seconds=outcome.training_seconds,
        **fields,
    )


def _finetune_tail(
    tail: nn.Module,
    bottleneck: nn.Module,
    head: nn.Module,
    batches: object,
    lr: float,
    device: torch.device,
    should_stop: Callable[[], bool] | None,
) -> None:
    params = list(tail.parameters()) + list(bottleneck.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    tail.train()
    for x, y in batches:  # type: ignore[attr-defined]
        if should_stop is not None and should_stop():
            raise Abandoned("stopped during tail fine-tuning")
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            code = bottleneck.encoder(head(x))
        loss = F.cross_entropy(tail(bottleneck.decoder(code)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tail.eval()
    for p in params:
        p.requires_grad_(False)
