"""Benchmark the importance engine against the authors' procedure, on one model and one image set.

Three ways to compute the same I-SPLIT curve (METHOD.md):

1. the authors' procedure, re-implemented: batch size 1 and, for every cut layer, a forward
   pass of the whole network (re-running every earlier layer to get that layer's activation)
   then a backward pass from the class score to that activation: the cost grows with the
   square of the depth. Like the authors, it visits only the non-skipped layers; unlike them it
   keeps running sums of the maps rather than every per-image map, and computes no parameter
   gradients (both only make it faster);
2. a per-image single pass: batch size 1, every cut in one forward and one backward
   (``accumulate_importance`` with ``batch_size=1``);
3. the engine: ``accumulate_importance`` with a batch.

All three run on the first ``--ref-images`` images and are compared (max relative CUI
difference, target <= 1e-4 in fp32); the authors' throughput comes from that run. Methods 1
and 2 both run at batch size 1 on the same kernels, so they must agree to rounding: that shows
the single pass computes what the per-cut re-forward computes. Batch B runs other kernels.
On images with flat regions (the upscaled digits) a max-pool window often holds values that
are equal in exact arithmetic; the gradient there is not unique, and a kernel that rounds them
differently by one ulp routes it to another pixel. Amplified by the cancelling channel mean of
Grad-CAM this shows as up to ~1e-3 relative CUI difference on the layers below that pool
(``--data synthetic`` noise images have no such ties and agree to ~1e-6). The authors'
procedure is therefore also run in float64 (``--fp64-reference``) to show each method's
distance from exact arithmetic. The check passes when every pair is within 1e-4, or when methods 1 and 2 agree
within 1e-4, the engine's candidates equal the authors' and its log10 CUI curve is within
1e-3 of theirs everywhere. Methods 2 and 3 are then timed on more images.

FLOPs (CUDA figures): forward = 2 x the multiply-accumulates of every Conv2d and Linear layer,
counted with hooks on one image; the engine's fwd+bwd = 2 x forward, because its backward
computes input gradients only (a training step, which also needs weight gradients, is ~3 x).
The fp32 engine is compared with ``--peak-tflops-fp32`` (67, H100/H200 SXM without TF32; TF32
is off unless ``--tf32``), the bf16 engine with ``--peak-tflops`` (989, H100/H200 SXM bf16
dense).

Models are randomly initialised (seeded); images are scikit-learn digits or seeded noise,
resized to the input size. Exits 1 when a check fails.

    PYTHONPATH=shared python benchmarks/bench_importance.py --arch vgg16 --input-size 64 \
        --images 64 --ref-images 8 --batch-size 16 --device cpu --json-out var/bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.machine

from benchmarks.machine import cpu_name, describe, load_line  # noqa: E402
from isplit.cuts import CutPoint, find_cut_points  # noqa: E402
from isplit.data import load_dataset, to_model_input  # noqa: E402
from isplit.importance import accumulate_importance, analysis_mode, curve_from_stats, local_maxima, log10_cui  # noqa: E402
from isplit.zoo import build_model  # noqa: E402

CUI_TOLERANCE = 1e-4  # max relative CUI difference between methods in fp32
LOG10_TOLERANCE = 1e-3  # max |delta log10 CUI| engine vs authors when the relative target is missed
BF16_TOLERANCE = 0.02  # max |delta log10 CUI| of the bf16 engine against fp32
FWD_BWD_FACTOR = 2.0  # fwd+bwd FLOPs / fwd FLOPs when the backward needs input gradients only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--width", type=float, default=1.0, help="VGG channel multiplier")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--images", type=int, default=64, help="images for the timed engine runs")
    p.add_argument("--ref-images", type=int, default=8, help="images for the authors' procedure and the check")
    p.add_argument("--per-image-images", type=int, default=None, help="images for the timed per-image pass")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="peak dense bf16 TFLOP/s for the bf16 achieved fraction (989 = H100/H200 SXM bf16 dense)",
    )
    p.add_argument(
        "--peak-tflops-fp32",
        type=float,
        default=67.0,
        help="peak fp32 TFLOP/s for the fp32 achieved fraction (67 = H100/H200 SXM fp32, no TF32)",
    )
    p.add_argument("--tf32", action="store_true", help="let cuDNN/cuBLAS use TF32 for the fp32 runs")
    p.add_argument(
        "--fp64-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the authors' procedure in float64 on the reference images",
    )
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    # Sharding (isplit.shards): a separate measurement, see shard_costs().
    p.add_argument("--shards", type=int, nargs="+", default=None,
                   help="instead of the method comparison: run the analysis as N shards in N processes, per N")  # fmt: skip
    p.add_argument("--shard-dataset", default="digits", help="data set of the sharded runs (grayscale)")
    return p.parse_args(argv)


# -- inputs ---------------------------------------------------------------------------------


def make_images(args: argparse.Namespace, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised images ``(n, C, S, S)`` float32 and labels ``(n,)`` int64 (CPU)."""
    if args.data == "synthetic":
        g = torch.Generator().manual_seed(args.seed)
        raw = torch.randint(0, 256, (n, args.in_channels, 32, 32), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, args.num_classes, (n,), generator=g)
    else:
        digits = load_dataset("digits", "train")
        idx = torch.arange(n) % len(digits)  # cycles when more images are asked for than exist
        raw = digits.images[idx].expand(-1, args.in_channels, -1, -1)
        labels = digits.labels[idx] % args.num_classes
    mean, std = [0.5] * args.in_channels, [0.25] * args.in_channels
    return to_model_input(raw, args.input_size, mean, std), labels


# -- timing ---------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``(fn(), seconds)`` with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


# -- method 1: the authors' procedure -------------------------------------------------------


def gradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM with the channel mean, written out independently of the engine:
    ``(1, C, H, W)`` or ``(1, F)`` -> ``(H, W)`` float64."""
    if activation.dim() == 2:
        activation, gradient = activation[..., None, None], gradient[..., None, None]
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).mean(dim=1))[0].double()


def authors_procedure(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, points: list[CutPoint], device: torch.device
) -> dict[str, float]:
    """CUI per non-skipped cut point: per image, per cut, a whole forward pass and a backward
    pass from the correct class's score to that cut's activation."""
    active = [p.module for p in points if not p.skipped]
    sums: dict[str, torch.Tensor] = {}
    with analysis_mode(model):
        for x, y in zip(images, labels, strict=True):
            x = x[None].to(device)
            for name in active:
                held: dict[str, torch.Tensor] = {}

                def as_leaf(_m: nn.Module, _i: object, out: torch.Tensor, held: dict = held) -> torch.Tensor:
                    # The rest of the network runs on a leaf copy, so backward stops at this layer.
                    held["a"] = out.detach().requires_grad_(True)
                    return held["a"]

                handle = model.get_submodule(name).register_forward_hook(as_leaf)
                try:
                    score = model(x)[0, int(y)]
                finally:
                    handle.remove()
                (grad,) = torch.autograd.grad(score, held["a"])
                cam = gradcam(held["a"].detach(), grad)
                sums[name] = cam if name not in sums else sums[name] + cam
    n = len(labels)
    return {name: abs(float(sums[name].sum()) / n / sums[name].numel()) for name in active}


# -- methods 2 and 3: the engine ------------------------------------------------------------


def engine(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    points: list[CutPoint],
    device: torch.device,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
):
    return accumulate_importance(
        model,
        (images, labels),
        batch_size=batch_size,
        device=device,
        cut_points=points,
        autocast_dtype=autocast_dtype,
    )


# -- checks and FLOPs -----------------------------------------------------------------------


def max_relative_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """Max over the common keys of ``|a - b| / max(|a|, |b|)`` (0 where both are 0)."""
    worst = 0.0
    for key in a.keys() & b.keys():
        scale = max(abs(a[key]), abs(b[key]))
        if scale > 0:
            worst = max(worst, abs(a[key] - b[key]) / scale)
    return worst


def candidates(points: list[CutPoint], cui: dict[str, float]) -> list[str]:
    """Local maxima of the log10 curve over the non-skipped points."""
    active = [p.module for p in points if not p.skipped]
    return [active[i] for i in local_maxima([log10_cui(cui[m]) for m in active])]


def forward_flops_per_image(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> float:
    """2 x the multiply-accumulates of every Conv2d and Linear layer for one image."""
    macs = 0

    def count(module: nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += out.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            macs += out.numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad(), analysis_mode(model):
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return 2.0 * macs


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 matmul rate: GFLOP/s of an ``n`` x ``n`` matmul (2 n^3 FLOPs), best of
    ``repeats`` after warm-up, on the threads the engine uses."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        _, seconds = timed(lambda: a @ b, device)
        best = min(best, seconds)
    return 2 * n**3 / best / 1e9


def onednn_gemm_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float | None:
    """The same ``n`` x ``n`` x ``n`` fp32 GEMM through oneDNN, the library the engine's CPU
    convolutions run on: a 1x1 convolution of ``n`` to ``n`` channels over ``n`` pixels
    (channels-last), best of ``repeats``; None off the CPU. torch's matmul calls MKL's sgemm,
    which on AMD CPUs runs well below what the machine does (2x below oneDNN on the AMD EPYC VM),
    so the engine's fraction is also given against the better of the two."""
    if device.type != "cpu":
        return None
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(n, n, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(1, n, n // 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
    best = math.inf
    with torch.no_grad():
        for _ in range(2):
            conv(x)
        for _ in range(repeats):
            _, seconds = timed(lambda: conv(x), device)
            best = min(best, seconds)
    return 2 * n**3 / best / 1e9


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # fp32 means fp32 unless asked: TF32 convolutions would blur the agreement check.
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    model = build_model(
        args.arch,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        input_size=args.input_size,
        width=args.width,
    ).to(device)
    shape = (args.in_channels, args.input_size, args.input_size)
    points = find_cut_points(model, shape)
    n_ref = min(args.ref_images, args.images)
    n_single = args.per_image_images or max(n_ref, min(args.images, 64))
    images, labels = make_images(args, max(args.images, n_single))
    images = images.to(device)  # inputs live on the device: we time the analysis, not the copy
    ref_x, ref_y = images[:n_ref], labels[:n_ref]
    bs = args.batch_size

    # Warm-up (CUDA kernels, cuDNN autotuning, allocator) outside every timed region.
    authors_procedure(model, ref_x[:1], ref_y[:1], points, device)
    engine(model, images[:2], labels[:2], points, device, 1)
    engine(model, images[:bs], labels[:bs], points, device, bs)

    # The three methods on the same reference images: agreement and the authors' throughput.
    authors_cui, authors_s = timed(lambda: authors_procedure(model, ref_x, ref_y, points, device), device)
    single_ref = engine(model, ref_x, ref_y, points, device, 1)
    batched_ref = engine(model, ref_x, ref_y, points, device, bs)
    single_cui = dict(zip((p.module for p in points), single_ref.cui(), strict=True))
    batched_cui = dict(zip((p.module for p in points), batched_ref.cui(), strict=True))
    agreement = {
        "images": n_ref,
        "authors_vs_engine": max_relative_difference(authors_cui, batched_cui),
        "per_image_vs_engine": max_relative_difference(single_cui, batched_cui),
        "authors_vs_per_image": max_relative_difference(authors_cui, single_cui),
        "tolerance": CUI_TOLERANCE,
        "candidates_authors": candidates(points, authors_cui),
        "candidates_engine": candidates(points, batched_cui),
        "max_abs_delta_log10_cui_authors_vs_engine": max(
            abs(log10_cui(authors_cui[k]) - log10_cui(batched_cui[k])) for k in authors_cui
        ),
    }
    pairs = ("authors_vs_engine", "per_image_vs_engine", "authors_vs_per_image")
    agreement["within_tolerance"] = all(agreement[k] <= CUI_TOLERANCE for k in pairs)
    agreement["same_curve"] = (
        agreement["authors_vs_per_image"] <= CUI_TOLERANCE
        and agreement["candidates_authors"] == agreement["candidates_engine"]
        and agreement["max_abs_delta_log10_cui_authors_vs_engine"] <= LOG10_TOLERANCE
    )
    if args.fp64_reference:
        exact = authors_procedure(copy.deepcopy(model).double(), ref_x.double(), ref_y, points, device)
        agreement["fp64_error_authors"] = max_relative_difference(authors_cui, exact)
        agreement["fp64_error_per_image"] = max_relative_difference(single_cui, exact)
        agreement["fp64_error_engine"] = max_relative_difference(batched_cui, exact)
    agreement["ok"] = agreement["within_tolerance"] or agreement["same_curve"]

    # Throughput of the single pass (batch 1) and of the engine, between two matmul-rate runs.
    matmul_before = matmul_gflops(device)
    _, single_s = timed(lambda: engine(model, images[:n_single], labels[:n_single], points, device, 1), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fp32_stats, engine_s = timed(
        lambda: engine(model, images[: args.images], labels[: args.images], points, device, bs), device
    )
    methods = {
        "authors": {"images": n_ref, "seconds": authors_s, "batch_size": 1},
        "per_image": {"images": n_single, "seconds": single_s, "batch_size": 1},
        "engine": {"images": args.images, "seconds": engine_s, "batch_size": bs},
    }
    if device.type == "cuda":
        methods["engine"]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for m in methods.values():
        m["images_per_second"] = m["images"] / m["seconds"]

    matmul_after = matmul_gflops(device)
    fwd = forward_flops_per_image(model, shape, device)
    flops = {
        "forward_flops_per_image": fwd,
        "convention": (
            "forward = 2 x conv/linear MACs; engine fwd+bwd = 2 x forward "
            "(the backward computes input gradients only, no weight gradients)"
        ),
        "engine_tflops": methods["engine"]["images_per_second"] * FWD_BWD_FACTOR * fwd / 1e12,
    }
    # The matmul rate around the timed runs (the machine may be shared: take the better one).
    flops["matmul_gflops"] = max(matmul_before, matmul_after)
    flops["matmul_gflops_before_after"] = [matmul_before, matmul_after]
    flops["engine_fraction_of_matmul"] = flops["engine_tflops"] * 1e3 / flops["matmul_gflops"]
    gemm = onednn_gemm_gflops(device)
    if gemm is not None:
        flops["onednn_gemm_gflops"] = gemm
        flops["best_gemm_gflops"] = max(gemm, flops["matmul_gflops"])
        flops["engine_fraction_of_best_gemm"] = flops["engine_tflops"] * 1e3 / flops["best_gemm_gflops"]
    if device.type == "cuda":
        flops["peak_tflops"] = args.peak_tflops if args.tf32 else args.peak_tflops_fp32
        flops["peak_kind"] = "tf32 (--peak-tflops)" if args.tf32 else "fp32 (--peak-tflops-fp32)"
        flops["engine_fraction_of_peak"] = flops["engine_tflops"] / flops["peak_tflops"]

    result = {
        "arch": args.arch,
        "width": args.width,
        "input_shape": list(shape),
        "num_classes": args.num_classes,
        "data": args.data,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine,
        "tf32": bool(args.tf32 and device.type == "cuda"),
        "cut_points": len(points),
        "non_skipped_cut_points": sum(not p.skipped for p in points),
        "methods": methods,
        "speedup": {
            "engine_vs_authors": methods["engine"]["images_per_second"] / methods["authors"]["images_per_second"],
            "engine_vs_per_image": methods["engine"]["images_per_second"] / methods["per_image"]["images_per_second"],
            "per_image_vs_authors": methods["per_image"]["images_per_second"] / methods["authors"]["images_per_second"],
        },
        "agreement": agreement,
        "flops": flops,
    }

    if args.amp == "bf16":
        bf16_stats, bf16_s = timed(
            lambda: engine(model, images[: args.images], labels[: args.images], points, device, bs, torch.bfloat16),
            device,
        )
        result["bf16"] = compare_bf16(fp32_stats, bf16_stats, args.images / bf16_s, fwd, args, device)
    return result


def compare_bf16(fp32_stats, bf16_stats, images_per_second: float, fwd: float, args, device) -> dict:
    fp32_curve, bf16_curve = curve_from_stats(fp32_stats), curve_from_stats(bf16_stats)
    deltas = [
        abs(a.log10_cui - b.log10_cui)
        for a, b in zip(fp32_curve.points, bf16_curve.points, strict=True)
        if not a.skipped
    ]
    out = {
        "images_per_second": images_per_second,
        "speedup_vs_fp32_engine": None,
        "candidates_fp32": fp32_curve.candidates,
        "candidates_bf16": bf16_curve.candidates,
        "candidates_unchanged": fp32_curve.candidates == bf16_curve.candidates,
        "best_unchanged": fp32_curve.best == bf16_curve.best,
        "max_abs_delta_log10_cui": max(deltas),
        "tolerance": BF16_TOLERANCE,
        "engine_tflops": images_per_second * FWD_BWD_FACTOR * fwd / 1e12,
    }
    out["ok"] = out["candidates_unchanged"] and out["max_abs_delta_log10_cui"] <= BF16_TOLERANCE
    if device.type == "cuda":
        out["peak_tflops"] = args.peak_tflops
        out["engine_fraction_of_peak"] = out["engine_tflops"] / args.peak_tflops
    return out


def report(r: dict) -> str:
    m, s, a, f = r["methods"], r["speedup"], r["agreement"], r["flops"]
    c, size = r["input_shape"][0], r["input_shape"][1]
    lines = [
        f"I-SPLIT importance benchmark: {r['arch']} (width {r['width']}) {c}x{size}x{size}, "
        f"{r['num_classes']} classes, random init, {r['data']} images",
        f"device {r['device']}, torch {r['torch']}, {r['threads']} threads; "
        f"{r['cut_points']} cut points ({r['non_skipped_cut_points']} non-skipped)",
        "",
        f"{'method':<46} {'batch':>5} {'images':>6} {'seconds':>9} {'images/s':>10} {'vs authors':>11}",
    ]
    names = {
        "authors": "authors' procedure (re-forward per cut)",
        "per_image": "per-image single pass (all cuts, 1 fwd+bwd)",
        "engine": "engine (accumulate_importance)",
    }
    base = m["authors"]["images_per_second"]
    for key, label in names.items():
        row = m[key]
        lines.append(
            f"{label:<46} {row['batch_size']:>5} {row['images']:>6} {row['seconds']:>9.3f} "
            f"{row['images_per_second']:>10.2f} {row['images_per_second'] / base:>10.1f}x"
        )
    lines += [
        "",
        f"speed-up: engine / authors = {s['engine_vs_authors']:.1f}x, engine / per-image = "
        f"{s['engine_vs_per_image']:.1f}x, per-image / authors = {s['per_image_vs_authors']:.1f}x",
        f"agreement on {a['images']} images (fp32), max relative CUI difference: authors vs engine "
        f"{a['authors_vs_engine']:.2e}, per-image vs engine {a['per_image_vs_engine']:.2e}, authors vs "
        f"per-image {a['authors_vs_per_image']:.2e} (target <= {a['tolerance']:.0e}: "
        f"{'met' if a['within_tolerance'] else 'NOT met'})",
        f"  max |delta log10 CUI| authors vs engine {a['max_abs_delta_log10_cui_authors_vs_engine']:.2e}; "
        f"candidates equal: {a['candidates_authors'] == a['candidates_engine']} ({', '.join(a['candidates_engine'])})",
    ]
    if "fp64_error_engine" in a:
        lines.append(
            f"  max relative error vs a float64 run of the authors' procedure: authors (fp32) "
            f"{a['fp64_error_authors']:.2e}, per-image {a['fp64_error_per_image']:.2e}, engine "
            f"{a['fp64_error_engine']:.2e}"
        )
    lines += [
        f"  verdict: {'OK' if a['ok'] else 'FAILED'}"
        + (
            ""
            if a["within_tolerance"] or not a["ok"]
            else " (same curve: batch-1 methods agree, equal candidates, |delta log10 CUI| <= 1e-3)"
        ),
        f"FLOPs: forward {f['forward_flops_per_image'] / 1e9:.3f} GFLOP/image; {f['convention']}",
        f"engine achieved {f['engine_tflops'] * 1e3:.1f} GFLOP/s (fp32) = "
        f"{100 * f['engine_fraction_of_matmul']:.1f} % of this machine's 2048^2 fp32 matmul rate "
        f"({f['matmul_gflops']:.1f} GFLOP/s, same threads, same run)"
        + (
            f" = {100 * f['engine_fraction_of_best_gemm']:.1f} % of the best fp32 GEMM here "
            f"({f['best_gemm_gflops']:.1f} GFLOP/s; oneDNN's {f['onednn_gemm_gflops']:.1f})"
            if "best_gemm_gflops" in f
            else ""
        )
        + (
            f" = {100 * f['engine_fraction_of_peak']:.2f} % of {f['peak_tflops']:.0f} TFLOP/s {f['peak_kind']} peak"
            if "peak_tflops" in f
            else ""
        ),
    ]
    if "peak_memory_gib" in m["engine"]:
        lines.append(f"engine peak GPU memory {m['engine']['peak_memory_gib']:.2f} GiB")
    if "bf16" in r:
        b = r["bf16"]
        lines.append(
            f"bf16 autocast engine: {b['images_per_second']:.2f} images/s "
            f"({b['images_per_second'] / m['engine']['images_per_second']:.2f}x fp32 engine, "
            f"{b['engine_tflops'] * 1e3:.1f} GFLOP/s"
            + (
                f" = {100 * b['engine_fraction_of_peak']:.2f} % of {b['peak_tflops']:.0f} TFLOP/s bf16 peak"
                if "engine_fraction_of_peak" in b
                else ""
            )
            + f"); candidates unchanged: {b['candidates_unchanged']}, best unchanged: {b['best_unchanged']}, "
            f"max |delta log10 CUI| {b['max_abs_delta_log10_cui']:.4f} (target <= {b['tolerance']}): "
            f"{'OK' if b['ok'] else 'MISSED'}"
        )
    return "\n".join(lines)


# -- sharding: what N shards cost and save ----------------------------------------------------


def shard_costs(args: argparse.Namespace) -> dict:
    """The same analysis (a checkpoint of the seeded model, ``--images`` of ``--shard-dataset``)
    run whole in this process, then as N shards in N processes (``isplit.shards.run_shards``, as
    ``isplit analyze --shards N`` does) and merged, for each N of ``--shards``. Each shard pays
    the process start, the model load and the data read again (``load_seconds``); the engine
    time is shared out. Checks that every merged curve equals the whole one (1e-4 relative)."""
    import tempfile

    from isplit.analysis import result_from_stats, run_analysis
    from isplit.checkpoint import ModelInfo, save_checkpoint
    from isplit.shards import load_stats, merge, run_shards

    classes = load_dataset(args.shard_dataset, "test").class_names
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=len(classes), in_channels=1, input_size=args.input_size,
                        width=args.width)  # fmt: skip
    info = ModelInfo(arch=args.arch, num_classes=len(classes), in_channels=1, input_size=args.input_size,
                     width=args.width, class_names=classes, mean=[0.5], std=[0.25])  # fmt: skip
    options = {"max_images": args.images, "batch_size": args.batch_size, "device": args.device}
    out: dict = {"dataset": args.shard_dataset, "device": args.device, "cpu": cpu_name(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        save_checkpoint(weights, model, info)
        run_analysis(weights, args.shard_dataset, **{**options, "max_images": args.batch_size})  # warm-up
        t0 = time.perf_counter()
        whole = run_analysis(weights, args.shard_dataset, **options)
        out["whole"] = {"wall_s": time.perf_counter() - t0, "engine_s": whole.seconds, "images": whole.curve.num_images}
        for n in args.shards:
            t0 = time.perf_counter()
            paths = run_shards(weights, args.shard_dataset, count=n, folder=Path(tmp) / f"n{n}", **options)
            computed = time.perf_counter() - t0
            shards = [load_stats(p) for p in paths]
            merged = result_from_stats(merge(shards))
            wall = time.perf_counter() - t0
            rel = max(abs(a.cui - b.cui) / max(abs(b.cui), 1e-30)
                      for a, b in zip(merged.curve.points, whole.curve.points, strict=True))  # fmt: skip
            same = merged.curve.candidates == whole.curve.candidates and merged.curve.best == whole.curve.best
            out["runs"].append({
                "shards": n,
                "wall_s": wall,
                "merge_s": wall - computed,
                "load_s": [s.meta.load_seconds for s in shards],
                "engine_s": [s.meta.seconds for s in shards],
                "start_s": computed - max(s.meta.load_seconds + s.meta.seconds for s in shards),
                "max_rel_cui_diff": rel,
                "ok": rel <= CUI_TOLERANCE and same,
            })  # fmt: skip
    return out


def shard_report(r: dict) -> str:
    w = r["whole"]
    lines = [f"sharding on {r['device']} ({r['cpu']}): {w['images']} images of {r['dataset']}",
             f"  whole, in process     {w['wall_s']:7.2f} s wall ({w['engine_s']:.2f} s engine)"]  # fmt: skip
    for run in r["runs"]:
        lines.append(
            f"  {run['shards']} shard(s), {run['shards']} proc  {run['wall_s']:7.2f} s wall = process start "
            f"{run['start_s']:.2f} + load/read {max(run['load_s']):.2f} + engine {max(run['engine_s']):.2f} "
            f"(shards: {', '.join(f'{x:.2f}' for x in run['engine_s'])}) + merge {run['merge_s']:.2f}; "
            f"max rel CUI diff {run['max_rel_cui_diff']:.1e} {'ok' if run['ok'] else 'FAILED'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.shards:
        result = shard_costs(args)
        print(shard_report(result))
        if args.json_out is not None:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result, indent=1))
        return 0 if all(run["ok"] for run in result["runs"]) else 1
    if args.amp == "bf16" and not args.device.startswith("cuda"):
        print("note: bf16 autocast on a CPU is slow and only checks the numbers", file=sys.stderr)
    result = run(args)
    if "bf16" in result:
        result["bf16"]["speedup_vs_fp32_engine"] = (
            result["bf16"]["images_per_second"] / result["methods"]["engine"]["images_per_second"]
        )
    result["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(report(result))
    print(load_line(result["machine"]))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json_out}")
    ok = result["agreement"]["ok"] and result.get("bf16", {}).get("ok", True)
    return 0 if ok and not math.isnan(result["speedup"]["engine_vs_authors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
