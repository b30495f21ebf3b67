"""Plots users look at first: the CUI curve beside the size curve, and a per-class heat table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from isplit.importance import ImportanceCurve  # noqa: E402


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
