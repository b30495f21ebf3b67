"""Measuring this machine as an edge device (``isplit edge profile``): the head at every cut,
timed as the edge client runs an exported head."""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from isplit import IsplitError, wire
from isplit.bottleneck import make_bottleneck
from isplit.cuts import CutPoint, split_at
from isplit.plan.costs import cut_costs
from isplit.plan.profiles import CutTiming, DeviceMeasurement


def _traced(module: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    # TorchScript, as the edge client runs an exported head.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), x, check_trace=False)


def measure_device(
    model: nn.Module,
    input_shape: Sequence[int],
    points: Sequence[CutPoint],
    *,
    arch: str = "",
    repeats: int = 20,
    bottleneck_ratio: int = 4,
    pause_s: float = 0.01,
) -> DeviceMeasurement:
    """Time, on this machine, the head at every non-skipped cut point, alone and followed by the
    bottleneck encoder of ``bottleneck_ratio``, and the whole model: one image, TorchScript (as
    the edge client runs an exported head), median of ``repeats``. Each timed call follows an
    idle pause of ``pause_s`` seconds, as an edge device's head call follows a wait on the
    network: a tight loop keeps caches and clocks warm and reports times several times lower
    than a device answering one request at a time. Also the fp16 encode rate."""
    if repeats < 1:
        raise IsplitError(f"repeats must be >= 1, got {repeats}")
    model = model.cpu().eval()
    x = torch.zeros(1, *input_shape)
    costs = cut_costs(model, input_shape, points)
    runs: dict[tuple[str, str], Callable[[], Any]] = {}
    largest = torch.zeros(0)
    with torch.inference_mode():
        runs[("", "model")] = _traced(model, x)
        for p in points:
            if p.skipped:
                continue
            head, _tail = split_at(model, p.module)
            runs[(p.module, "head")] = _traced(head, x)
            encoder = make_bottleneck(p.output_shape, bottleneck_ratio).encoder
            runs[(p.module, "bottleneck")] = _traced(nn.Sequential(head, encoder), x)
            code = runs[(p.module, "head")](x)
            largest = code if code.numel() > largest.numel() else largest
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn(x)  # warm-up: first calls allocate and optimise the graph
            fn(x)
        for _ in range(repeats):
            for key, fn in runs.items():
                time.sleep(pause_s)
                t0 = time.perf_counter()
                fn(x)
                times[key].append(1e3 * (time.perf_counter() - t0))
        # The rate on the largest code, where bytes (not the per-call overhead) dominate.
        encode_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            wire.encode(largest, "fp16")
            encode_s.append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) for k, v in times.items()}
    timings = {
        p.module: CutTiming(head_ms=ms[(p.module, "head")], bottleneck_head_ms=ms[(p.module, "bottleneck")])
        for p in points
        if not p.skipped
    }
    total_ms = ms[("", "model")]
    return DeviceMeasurement(
        host=platform.node(),
        machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        torch_threads=torch.get_num_threads(),
        arch=arch,
        input_shape=list(input_shape),
        total_flops=costs.total_flops,
        total_ms=total_ms,
        gflops=costs.total_flops / (total_ms * 1e6),
        encode_mb_per_s=4 * largest.numel() / max(statistics.median(encode_s), 1e-9) / 1e6,
        repeats=repeats,
        bottleneck_ratio=bottleneck_ratio,
        pause_ms=1e3 * pause_s,
        cuts=timings,
    )
