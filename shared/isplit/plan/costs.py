"""What a cut costs: the cost profile of every cut point (computed by every analysis) and what
the trainer measured for a retrained candidate.

FLOPs are forward FLOPs per image (:func:`layer_flops`); bytes are fp32 unless an encoding is
named.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from isplit import IsplitError, wire
from isplit.cuts import CutPoint, probe_forward
from isplit.importance import CutScore

Encoding = Literal["fp32", "fp16", "int8"]
ENCODINGS: tuple[Encoding, ...] = ("fp32", "fp16", "int8")


# -- cost profile ---------------------------------------------------------------------------


_FLOP_LAYERS: dict[str, type[nn.Module]] = {
    "Conv2d": nn.Conv2d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "Linear": nn.Linear,
}


def flop_layer_kind(module: nn.Module) -> str | None:
    """``"Conv2d"``, ``"ConvTranspose2d"`` or ``"Linear"`` for a layer whose FLOPs count (also a
    layer of a torch.export program, by its original class), else None."""
    for name, cls in _FLOP_LAYERS.items():
        if isinstance(module, cls):
            return name
    original = getattr(module, "original_type", "")
    name = original.rsplit(".", 1)[-1]
    if original.startswith("torch.nn.modules.") and name in _FLOP_LAYERS and hasattr(module, "weight"):
        return name
    return None


def layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Forward FLOPs of one call of a conv, transposed conv or linear layer on a batch
    (2 x multiply-accumulates); 0 for any other layer (norms, activations, pooling are
    memory-bound and left out, as usual in split-computing cost models). The weight's shape
    gives the fan-in, so layers of torch.export programs count too."""
    kind = flop_layer_kind(module)
    if kind is None:
        return 0
    w = module.weight.shape
    if kind == "Conv2d":  # weight (out, in / groups, kh, kw)
        macs = out.numel() * w[1] * w[2] * w[3]
    elif kind == "ConvTranspose2d":  # weight (in, out / groups, kh, kw)
        macs = inp.numel() * w[1] * w[2] * w[3]
    else:  # Linear: weight (out, in)
        macs = out.numel() * w[1]
    return 2 * macs


class CutCost(BaseModel):
    """What running the network up to (and including) ``module`` costs, per image.

    FLOPs are forward FLOPs (see :func:`layer_flops`); ``head_param_bytes`` is fp32;
    ``head_peak_activation_bytes`` is the largest ``input + output`` of one head layer in fp32
    (what a layer-by-layer runtime must hold at once; residual blocks also keep their skip
    input, which this lower bound leaves out); ``payload_bytes`` is the raw tensor at the cut
    under each wire encoding (no bottleneck, no header).
    """

    module: str
    head_flops: int
    tail_flops: int
    head_flops_fraction: float
    head_params: int
    head_param_bytes: int
    head_peak_activation_bytes: int
    payload_bytes: dict[Encoding, int]


class CostProfile(BaseModel):
    """Cost of every cut point of one model (``cuts`` in network order, skipped ones included).

    ``input_shape`` is ``(C, H, W)``; ``input_bytes`` is the image as 8-bit pixels (what an
    all-on-server deployment sends).
    """

    input_shape: list[int]
    input_bytes: int
    total_flops: int
    total_params: int
    cuts: list[CutCost]

    def cut(self, module: str) -> CutCost:
        for c in self.cuts:
            if c.module == module:
                return c
        raise KeyError(module)


def cut_costs(model: nn.Module, input_shape: Sequence[int], points: Sequence[CutPoint | CutScore]) -> CostProfile:
    """The cost profile of ``model`` for one ``(C, H, W)`` input at each of ``points``.

    One forward pass of a zero image: every leaf module reports its FLOPs and activation size
    in execution order, every cut point the moment its output is ready; a cut's head is all that
    ran before (true at single-tensor cut points, where nothing computed later is needed).
    """
    events: list[tuple[str, Any]] = []  # ("layer", (flops, params, act_bytes)) or ("cut", name)
    seen_params: set[int] = set()
    cut_names = {p.module for p in points}

    def leaf_hook(m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
        fresh = [p for p in m.parameters(recurse=False) if id(p) not in seen_params]
        seen_params.update(id(p) for p in fresh)
        act = 4 * ((x.numel() if x is not None else 0) + (out.numel() if isinstance(out, torch.Tensor) else 0))
        events.append(("layer", (layer_flops(m, x, out) if x is not None else 0, sum(p.numel() for p in fresh), act)))

    def cut_hook(name: str) -> Callable[..., None]:
        return lambda _m, _i, _o: events.append(("cut", name))

    hooks = []
    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append((m, leaf_hook))
        if name in cut_names:
            hooks.append((m, cut_hook(name)))  # registered after, so it runs after its children's
    probe_forward(model, input_shape, hooks)
    flops = params = peak = 0
    at_cut: dict[str, tuple[int, int, int]] = {}
    for kind, value in events:
        if kind == "layer":
            flops, params, peak = flops + value[0], params + value[1], max(peak, value[2])
        else:
            at_cut.setdefault(value, (flops, params, peak))
    total = max(flops, 1)
    cuts = []
    for p in points:
        head_flops, head_params, head_peak = at_cut[p.module]
        cuts.append(
            CutCost(
                module=p.module,
                head_flops=head_flops,
                tail_flops=flops - head_flops,
                head_flops_fraction=head_flops / total,
                head_params=head_params,
                head_param_bytes=4 * head_params,
                head_peak_activation_bytes=head_peak,
                payload_bytes={e: wire.payload_nbytes(p.output_shape, e) for e in ENCODINGS},
            )
        )
    return CostProfile(
        input_shape=list(input_shape),
        input_bytes=math.prod(input_shape),
        total_flops=flops,
        total_params=sum(p.numel() for p in model.parameters()),
        cuts=cuts,
    )


# -- what the trainer measured --------------------------------------------------------------


class MeasuredCut(BaseModel):
    """What the trainer measured for a retrained candidate (a ``TrainingResult``'s figures).

    ``accuracy`` in [0, 1] (on the analysed class subset when there is one);
    ``bytes_per_image``: the bottleneck code on the wire per encoding; ``head_flops`` and
    ``tail_flops`` include the bottleneck encoder and decoder; ``latency_ms`` is the network +
    tail time TorchServe answered in at registration (one image, the trainer's link).
    """

    accuracy: float | None = None
    accuracy_original: float | None = None
    bytes_per_image: dict[str, int] = Field(default_factory=dict)
    head_flops: int | None = None
    tail_flops: int | None = None
    latency_ms: float | None = None


def measured_from_results(results: Iterable[Mapping[str, Any]], *, subset: bool) -> dict[str, MeasuredCut]:
    """``{cut: MeasuredCut}`` from ``TrainingResult`` dicts; failed results are left out.

    With ``subset`` the subset accuracies are used (when the trainer reported them).
    """
    out: dict[str, MeasuredCut] = {}
    for r in results:
        if not r or r.get("status") != "succeeded" or r.get("accuracy_split") is None:
            continue
        acc, orig = r.get("accuracy_split"), r.get("accuracy_original")
        if subset and r.get("accuracy_split_subset") is not None:
            acc, orig = r["accuracy_split_subset"], r.get("accuracy_original_subset", orig)
        out[str(r["cut"])] = MeasuredCut(
            accuracy=acc,
            accuracy_original=orig,
            bytes_per_image=dict(r.get("bytes_per_image") or {}),
            head_flops=r.get("head_flops"),
            tail_flops=r.get("tail_flops"),
            latency_ms=r.get("latency_ms"),
        )
    return out


def load_measured(path: Path, *, subset: bool) -> dict[str, MeasuredCut]:
    """``measured.json`` of an analysis directory (a list of ``TrainingResult`` dicts) or {}."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IsplitError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, list):
        raise IsplitError(f"{path} must hold a list of training results, got {type(data).__name__}")
    return measured_from_results(data, subset=subset)
