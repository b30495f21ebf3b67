"""Plots: the CUI curve beside the size curve, a per-class heat table, a sweep's measured
accuracy against CUI and size (``isplit experiment``), and a deployment plan (``isplit plan``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from isplit.importance import LOG10_FLOOR, ImportanceCurve  # noqa: E402

if TYPE_CHECKING:
    from isplit.experiment.schema import SweepResult
    from isplit.plan import Plan


def plot_curve(curve: ImportanceCurve, path: Path, *, title: str = "I-SPLIT importance") -> Path:
    """Write a PNG: log10 CUI per non-skipped cut (candidates and best marked) and, on a
    second axis, log10 of the cut's output bytes (the size baseline)."""
    pts = [p for p in curve.points if not p.skipped]
    xs = list(range(len(pts)))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(pts)), 4.5))
    ax.plot(xs, [p.log10_cui for p in pts], "-o", color="tab:blue", ms=3, label="log10 CUI (I-SPLIT)")
    for i, p in enumerate(pts):
        if p.module in curve.candidates:
            ax.plot(i, p.log10_cui, "^", color="tab:orange", ms=9)
        if p.module == curve.best:
            ax.plot(i, p.log10_cui, "*", color="tab:red", ms=16, label=f"best: {p.module}")
    ax.plot([], [], "^", color="tab:orange", label="candidates (local maxima)")
    ax.set_xticks(xs, [p.module for p in pts], rotation=70, fontsize=7)
    ax.set_ylabel("log10 CUI")
    size_ax = ax.twinx()
    size_ax.plot(xs, [math.log10(p.output_bytes) for p in pts], "--", color="gray", label="log10 output bytes")
    size_ax.set_ylabel("log10 bytes per image (fp32)", color="gray")
    subset = "all classes" if curve.classes is None else f"classes {curve.classes}"
    ax.set_title(f"{title} — {subset}, {curve.num_images} images, target={curve.target}")
    lines = ax.get_legend_handles_labels()
    size_lines = size_ax.get_legend_handles_labels()
    ax.legend(lines[0] + size_lines[0], lines[1] + size_lines[1], fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_class_heat(curve: ImportanceCurve, class_names: Sequence[str], path: Path) -> Path:
    """Write a PNG heat table: one row per class, one column per non-skipped cut, colour =
    log10 CUI of that class's curve; each row's best cut is boxed."""
    active = [i for i, p in enumerate(curve.points) if not p.skipped]
    rows = sorted(curve.per_class, key=int)
    data = [[curve.per_class[k].log10_cui[i] for i in active] for k in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(active)), 0.4 * len(rows) + 2))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    for r, k in enumerate(rows):
        best = curve.per_class[k].best
        c = [curve.points[i].module for i in active].index(best)
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_yticks(range(len(rows)), [class_names[int(k)] if int(k) < len(class_names) else k for k in rows])
    ax.set_xticks(range(len(active)), [curve.points[i].module for i in active], rotation=70, fontsize=7)
    fig.colorbar(im, ax=ax, label="log10 CUI")
    ax.set_title("Per-class importance (red box: each class's best cut)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(result: SweepResult, path: Path) -> Path:
    """Write a PNG: the curves with measured accuracy along the network (top), and measured
    accuracy against log10 CUI and against output bytes (bottom)."""
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
    seeds = result.parameters.seeds
    acc_ax.errorbar([x_of[c.module] for c in result.cuts], [100 * c.accuracy for c in result.cuts],
                    yerr=[100 * (c.accuracy_sd or 0.0) for c in result.cuts], fmt="ks", ms=6, capsize=3,
                    label=f"measured accuracy, all classes (mean ± sd of {seeds} seeds)")  # fmt: skip
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
        ax.set_title(f"ρ = {_signed2(corr.spearman)}, τ = {_signed2(corr.kendall)}, n = {corr.n}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("measured test accuracy (%)")
        if key == "size":
            ax.invert_xaxis()  # the baseline's "better" to the right, as for CUI
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _signed2(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def plot_plan(plan: Plan, curve: ImportanceCurve, path: Path, *, title: str = "deployment plan") -> Path:
    """Write a PNG: estimated latency against the accuracy signal (log10 CUI; measured accuracy
    written beside the cuts that have one) per cut, the Pareto front joined and the
    recommendation starred (left); the CUI curve with the feasible cuts shaded (right)."""
    fig, (ax, cui_ax) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    front = sorted((c for c in plan.cuts if c.module in plan.pareto), key=lambda c: c.latency_ms)
    ax.plot(
        [c.latency_ms for c in front], [c.log10_cui for c in front], "-", color="tab:green", lw=1, label="Pareto front"
    )
    for c in plan.cuts:
        style = {"color": "tab:blue"} if c.feasible else {"color": "lightgray", "mfc": "none"}
        ax.plot(c.latency_ms, c.log10_cui, "o", ms=6, **style)
        note = c.module + (f" ({100 * c.accuracy:.0f} %)" if c.accuracy is not None else "")
        ax.annotate(note, (c.latency_ms, c.log10_cui), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if plan.recommended is not None:
        r = plan.cut(plan.recommended)
        ax.plot(r.latency_ms, r.log10_cui, "*", color="tab:red", ms=16, label=f"recommended: {r.module}")
    ax.plot([], [], "o", color="tab:blue", label="feasible")
    ax.plot([], [], "o", color="lightgray", mfc="none", label="infeasible")
    ax.set_xscale("log")
    ax.set_xlabel("estimated end-to-end latency per image (ms)")
    ax.set_ylabel("accuracy signal: log10 CUI")
    ax.legend(fontsize=7, loc="lower right")
    d = plan.deployment
    ax.set_title(f"{d.device.name} / {d.link.name} {d.link.uplink_mbps:g} Mbit/s / {d.server.name}", fontsize=9)
    pts = [p for p in curve.points if not p.skipped]
    feasible = {c.module for c in plan.cuts if c.feasible}
    for i, p in enumerate(pts):
        if p.module in feasible:
            cui_ax.axvspan(i - 0.5, i + 0.5, color="tab:green", alpha=0.12, lw=0)
    cui_ax.plot(range(len(pts)), [p.log10_cui for p in pts], "-o", color="tab:blue", ms=3, label="log10 CUI")
    for i, p in enumerate(pts):
        if p.module in curve.candidates:
            cui_ax.plot(i, p.log10_cui, "^", color="tab:orange", ms=9)
        if p.module == plan.recommended:
            cui_ax.plot(i, p.log10_cui, "*", color="tab:red", ms=16)
    cui_ax.plot([], [], "^", color="tab:orange", label="candidates (local maxima)")
    cui_ax.fill_between([], [], color="tab:green", alpha=0.12, label="feasible under the constraints")
    cui_ax.set_xticks(range(len(pts)), [p.module for p in pts], rotation=70, fontsize=7)
    cui_ax.set_ylabel("log10 CUI")
    cui_ax.legend(fontsize=7, loc="lower right")
    cui_ax.set_title(f"{title}: binding {', '.join(plan.binding) or 'nothing'}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
