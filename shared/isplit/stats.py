"""Rank statistics used to check predictions against measurements (no SciPy needed)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

EXACT_PERMUTATIONS_UP_TO = 8  # n! orderings enumerated exactly up to this n (8! = 40,320)


def ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1 = smallest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when undefined (fewer than 2 points or a constant input)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"lengths differ: {n} and {len(y)}")
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on average ranks); None when undefined."""
    return pearson(ranks(x), ranks(y))


def kendall(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b; None when undefined."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"lengths differ: {n} and {len(y)}")
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else None


def cut_predictors(log10_cui: Sequence[float], output_bytes: Sequence[int]) -> dict[str, list[float]]:
    """The two predictors of a cut's accuracy that isplit compares, each higher = better:
    ``"cui"`` (log10 CUI at the cut) and ``"size"`` (minus the output bytes at the cut, the
    architecture-only baseline). Aligned with the inputs."""
    return {"cui": [float(v) for v in log10_cui], "size": [-float(b) for b in output_bytes]}


def permutation_p(
    statistic: Callable[[Sequence[float], Sequence[float]], float | None],
    x: Sequence[float],
    y: Sequence[float],
    *,
    permutations: int,
    seed: int,
) -> float | None:
    """One-sided p-value of ``statistic(x, y)`` being this large by chance (``y`` shuffled).

    Exact over all orderings for ``len(y) <= 8``; otherwise ``permutations`` seeded random
    shuffles, with the (hits + 1) / (draws + 1) estimate. None when the statistic is undefined.
    """
    observed = statistic(x, y)
    if observed is None:
        return None
    eps = 1e-12  # equal statistics count as hits despite float round-off
    if len(y) <= EXACT_PERMUTATIONS_UP_TO:
        hits = total = 0
        for perm in itertools.permutations(y):
            value = statistic(x, perm)
            hits += value is not None and value >= observed - eps
            total += 1
        return hits / total
    rng = random.Random(seed)
    shuffled = list(y)
    hits = 0
    for _ in range(permutations):
        rng.shuffle(shuffled)
        value = statistic(x, shuffled)
        hits += value is not None and value >= observed - eps
    return (hits + 1) / (permutations + 1)


def rank_residuals(values: Sequence[float], controls: Sequence[Sequence[float]]) -> list[float]:
    """Residuals of the ranks of ``values`` after a least-squares fit on the ranks of each of
    ``controls`` (plus an intercept): what is left of the order once the controls explain theirs."""
    import numpy as np

    y = np.asarray(ranks(values), dtype=np.float64)
    design = np.column_stack([np.ones(len(values))] + [np.asarray(ranks(c), dtype=np.float64) for c in controls])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return [float(v) for v in y - design @ coef]


def partial_spearman(
    x: Sequence[float],
    y: Sequence[float],
    controls: Sequence[Sequence[float]],
    *,
    permutations: int,
    seed: int,
) -> tuple[float | None, float | None]:
    """Partial Spearman correlation of ``x`` with ``y`` given ``controls``, and its one-sided p.

    Both variables' ranks are residualised on the controls' ranks; the statistic is the Pearson
    correlation of the residuals, its p-value a permutation test that shuffles ``y``'s residuals
    (the Freedman-Lane scheme: under the null, ``y`` holds nothing beyond the controls).
    ``(None, None)`` when fewer than ``len(controls) + 3`` points make it undefined.
    """
    n = len(x)
    if n != len(y) or any(len(c) != n for c in controls):
        raise ValueError("x, y and every control must have the same length")
    if n < len(controls) + 3:
        return None, None
    rx, ry = rank_residuals(x, controls), rank_residuals(y, controls)
    if max(map(abs, rx)) < 1e-9 or max(map(abs, ry)) < 1e-9:
        return None, None  # the controls explain the whole order
    rho = pearson(rx, ry)
    return rho, permutation_p(pearson, rx, ry, permutations=permutations, seed=seed)
