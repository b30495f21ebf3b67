"""The claim, in numbers: which cuts to measure, how CUI and size rank them against measured
accuracy, and the cut each method would pick. Pure functions over measurements."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

from isplit import IsplitError
from isplit.experiment.schema import (
    BudgetPicks,
    Correlation,
    CutMeasurement,
    PartialCorrelation,
    Pick,
    Picks,
    SizeControl,
)
from isplit.importance import (
    ImportanceCurve,
    ImportanceStats,
    curve_from_stats,
)
from isplit.stats import cut_predictors, kendall, partial_spearman, permutation_p, spearman


def spanning_order(n: int) -> list[int]:
    """``0..n-1`` ordered so that every prefix spans the range: ends first, then midpoints.

    Work done in this order and cut short by a time budget still covers the whole network.
    """
    if n <= 0:
        return []
    order = [0] + ([n - 1] if n > 1 else [])
    gaps = [(0, n - 1)]
    while gaps:
        next_gaps = []
        for lo, hi in gaps:
            if hi - lo > 1:
                mid = (lo + hi) // 2
                order.append(mid)
                next_gaps += [(lo, mid), (mid, hi)]
        gaps = next_gaps
    return order


def choose_cuts(active: Sequence[str], cuts: Sequence[str] | None, max_cuts: int | None) -> list[str]:
    """The cuts to measure, in network order: ``cuts`` as given (validated), or ``max_cuts``
    evenly spanning ``active`` (the non-skipped cut points), or all of ``active``."""
    if cuts:
        bad = [c for c in cuts if c not in active]
        if bad:
            raise IsplitError(f"cut {bad[0]!r} is not a non-skipped cut point; choose from: {', '.join(active)}")
        return [c for c in active if c in set(cuts)]
    if max_cuts is None or max_cuts >= len(active):
        return list(active)
    if max_cuts < 2:
        raise IsplitError(f"max-cuts must be >= 2 to span the network, got {max_cuts}")
    idx = sorted({round(i * (len(active) - 1) / (max_cuts - 1)) for i in range(max_cuts)})
    return [active[i] for i in idx]


def correlate(predicted: Sequence[float], measured: Sequence[float], *, permutations: int, seed: int) -> Correlation:
    """Spearman and Kendall of ``predicted`` with ``measured``, with permutation p-values."""
    if len(predicted) < 3:
        return Correlation(n=len(predicted), spearman=None, spearman_p=None, kendall=None, kendall_p=None)
    return Correlation(
        n=len(predicted),
        spearman=spearman(predicted, measured),
        spearman_p=permutation_p(spearman, predicted, measured, permutations=permutations, seed=seed),
        kendall=kendall(predicted, measured),
        kendall_p=permutation_p(kendall, predicted, measured, permutations=permutations, seed=seed + 1),
    )


def size_pick(curve: ImportanceCurve) -> tuple[str, list[str]]:
    """The size baseline's cut: the smallest output (the earliest such cut, which keeps the
    least work on the edge), and the other cuts with exactly that size."""
    active = [p for p in curve.points if not p.skipped]
    smallest = min(p.output_bytes for p in active)
    tied = [p.module for p in active if p.output_bytes == smallest]
    return tied[0], tied[1:]


def subset_search(
    stats: ImportanceStats,
    all_best: str,
    *,
    count: int,
    min_margin: float = 0.05,
    sizes: Sequence[int] = (2, 3),
) -> list[tuple[list[int], ImportanceCurve]]:
    """Class subsets whose curve peaks at a cut other than ``all_best``, most decisive first.

    Searches all pairs and triples of analysed classes. The margin of a subset is its
    curve's log10 CUI at its own best minus at ``all_best``. Subsets whose margin reaches
    ``min_margin`` come first, then those that move the best cut only within a near-tie;
    within each group, larger margins first, preferring a best cut no earlier pick has, then
    classes disjoint from earlier picks. When fewer than ``count`` subsets move the best cut,
    the rest are the subsets whose curves rank ``all_best`` lowest (their ``best`` equals
    ``all_best`` or ties with it: not moves; the report says so).
    """
    present = [k for k in range(stats.counts.numel()) if int(stats.counts[k]) > 0]
    scored: list[tuple[float, list[int], ImportanceCurve]] = []
    for size in sizes:
        for combo in itertools.combinations(present, size):
            curve = curve_from_stats(stats, list(combo))
            scored.append((best_margin(curve, all_best), list(combo), curve))
    # A margin of 0 is a tie broken by network order, not a move.
    moved = sorted((s for s in scored if s[2].best != all_best and s[0] > 0), key=lambda s: -s[0])
    chosen: list[tuple[list[int], ImportanceCurve]] = []
    for group in ([s for s in moved if s[0] >= min_margin], [s for s in moved if s[0] < min_margin]):
        while group and len(chosen) < count:
            bests = {c.best for _, c in chosen}
            used = {k for classes, _ in chosen for k in classes}
            pool = (
                [s for s in group if s[2].best not in bests and not used & set(s[1])]
                or [s for s in group if s[2].best not in bests]
                or [s for s in group if not used & set(s[1])]
                or group
            )
            _, classes, curve = pool[0]
            chosen.append((classes, curve))
            group = [s for s in group if s[1] != classes]
    if len(chosen) < count:
        taken = [classes for classes, _ in chosen]
        rest = sorted((s for s in scored if s[1] not in taken), key=lambda s: _rank_of(s[2], all_best), reverse=True)
        chosen += [(classes, curve) for _, classes, curve in rest[: count - len(chosen)]]
    return chosen


def best_margin(curve: ImportanceCurve, all_best: str) -> float:
    return curve.point(curve.best).log10_cui - curve.point(all_best).log10_cui


def _rank_of(curve: ImportanceCurve, module: str) -> int:
    active = sorted((p for p in curve.points if not p.skipped), key=lambda p: -p.log10_cui)
    return [p.module for p in active].index(module)


def subset_accuracy(per_class: Sequence[float | None], counts: Sequence[int], classes: Sequence[int]) -> float | None:
    correct = sum((per_class[k] or 0.0) * counts[k] for k in classes)
    total = sum(counts[k] for k in classes)
    return correct / total if total else None


def _pick(
    method: Literal["cui", "size", "oracle"], module: str, tied: Sequence[str], cuts: Sequence[CutMeasurement]
) -> Pick:
    by_module = {c.module: c for c in cuts}
    measured = by_module.get(module)
    tie_acc = [by_module[m].accuracy for m in [module, *tied] if m in by_module]
    return Pick(
        method=method,
        module=module,
        accuracy=measured.accuracy if measured else None,
        output_bytes=measured.output_bytes if measured else 0,
        tied=list(tied),
        tie_mean_accuracy=sum(tie_acc) / len(tie_acc) if tied and tie_acc else None,
        accuracy_sd=measured.accuracy_sd if measured else None,
        head_flops_fraction=measured.head_flops_fraction if measured else None,
    )


def within_budget(curve: ImportanceCurve, fractions: dict[str, float], budget: float) -> list[str]:
    """Non-skipped cuts whose head costs at most ``budget`` of the network's FLOPs, in network order."""
    return [p.module for p in curve.points if not p.skipped and fractions[p.module] <= budget + 1e-9]


def budget_cui_pick(curve: ImportanceCurve, eligible: Sequence[str]) -> tuple[str | None, bool]:
    """I-SPLIT's cut inside a budget: the local maximum with the highest CUI among ``eligible``,
    else (none fits) the eligible cut with the highest CUI; and whether it is a local maximum."""
    cands = [m for m in eligible if m in set(curve.candidates)]
    pool = cands or list(eligible)
    if not pool:
        return None, False
    return max(pool, key=lambda m: curve.point(m).log10_cui), bool(cands)


def budget_size_pick(curve: ImportanceCurve, eligible: Sequence[str]) -> tuple[str | None, list[str]]:
    """The size baseline inside a budget: the smallest output (earliest of a tie) and its ties."""
    if not eligible:
        return None, []
    smallest = min(curve.point(m).output_bytes for m in eligible)
    tied = [m for m in eligible if curve.point(m).output_bytes == smallest]
    return tied[0], tied[1:]


def budget_picks(
    curves: Sequence[ImportanceCurve],
    cuts: Sequence[CutMeasurement],
    fractions: dict[str, float],
    budgets: Sequence[float],
) -> list[BudgetPicks]:
    """Per curve (target) and budget: I-SPLIT's, the size baseline's and the best measured cut
    among the cuts whose head costs at most the budget (see :class:`BudgetPicks`)."""
    rows = []
    for curve in curves:
        for budget in budgets:
            eligible = within_budget(curve, fractions, budget)
            cui, is_candidate = budget_cui_pick(curve, eligible)
            size, size_tied = budget_size_pick(curve, eligible)
            measured = [c for c in cuts if c.module in set(eligible)]
            oracle = max(measured, key=lambda c: c.accuracy, default=None)
            rows.append(
                BudgetPicks(
                    budget=budget,
                    target=curve.target,
                    cui_is_candidate=is_candidate,
                    cui=_with_bytes(_pick("cui", cui, [], cuts), curve) if cui else None,
                    size=_with_bytes(_pick("size", size, size_tied, cuts), curve) if size else None,
                    oracle=_with_bytes(_pick("oracle", oracle.module, [], cuts), curve) if oracle else None,
                )
            )
    return rows


def _with_bytes(pick: Pick, curve: ImportanceCurve) -> Pick:
    pick.output_bytes = curve.point(pick.module).output_bytes
    return pick


def budget_modules(
    curves: Sequence[ImportanceCurve], fractions: dict[str, float], budgets: Sequence[float]
) -> list[str]:
    """Every cut some method picks inside some budget (they must be measured to compare)."""
    out: list[str] = []
    for curve in curves:
        for budget in budgets:
            eligible = within_budget(curve, fractions, budget)
            out += [m for m in (budget_cui_pick(curve, eligible)[0], budget_size_pick(curve, eligible)[0]) if m]
    return list(dict.fromkeys(out))


def partial_correlations(cuts: Sequence[CutMeasurement], *, permutations: int, seed: int) -> list[PartialCorrelation]:
    """What CUI adds beyond size: partial Spearman of measured accuracy with log10 CUI given
    −output bytes, and given −output bytes and depth (position in the network)."""
    acc = [c.accuracy for c in cuts]
    cui = [c.log10_cui for c in cuts]
    controls = {"size": [-float(c.output_bytes) for c in cuts], "depth": [float(c.position) for c in cuts]}
    out = []
    for k, names in enumerate((["size"], ["size", "depth"])):
        rho, p = partial_spearman(cui, acc, [controls[n] for n in names], permutations=permutations, seed=seed + 11 + k)
        out.append(PartialCorrelation(controls=names, n=len(cuts), rho=rho, p=p))
    return out


def size_control(cuts: Sequence[CutMeasurement]) -> SizeControl:
    """CUI against accuracy where size cannot discriminate (see :class:`SizeControl`)."""
    concordant = discordant = tied = pairs = 0
    for a, b in itertools.combinations(cuts, 2):
        if a.output_bytes != b.output_bytes:
            continue
        pairs += 1
        order = (a.log10_cui > b.log10_cui) - (a.log10_cui < b.log10_cui)
        measured = (a.accuracy > b.accuracy) - (a.accuracy < b.accuracy)
        if order == 0 or measured == 0:
            tied += 1
        elif order == measured:
            concordant += 1
        else:
            discordant += 1
    predictors = cut_predictors([c.log10_cui for c in cuts], [c.output_bytes for c in cuts])
    agreement = spearman(predictors["cui"], predictors["size"]) if len(cuts) >= 3 else None
    return SizeControl(
        agreement=agreement, equal_size_pairs=pairs, concordant=concordant, discordant=discordant, tied=tied
    )


def evaluate_claim(
    curve: ImportanceCurve, cuts: Sequence[CutMeasurement], *, permutations: int, seed: int
) -> tuple[dict[str, Correlation], Picks]:
    """Correlations of measured accuracy with log10 CUI and with -output_bytes, and the picks."""
    acc = [c.accuracy for c in cuts]
    predictors = cut_predictors([c.log10_cui for c in cuts], [c.output_bytes for c in cuts])
    correlations = {
        "cui": correlate(predictors["cui"], acc, permutations=permutations, seed=seed),
        "size": correlate(predictors["size"], acc, permutations=permutations, seed=seed + 2),
    }
    size_module, size_tied = size_pick(curve)
    oracle = max(cuts, key=lambda c: c.accuracy) if cuts else None
    oracle_tied = [c.module for c in cuts if oracle and c.accuracy == oracle.accuracy and c is not oracle]
    picks = Picks(
        cui=_pick("cui", curve.best, [], cuts),
        size=_pick("size", size_module, size_tied, cuts),
        oracle=_pick("oracle", oracle.module if oracle else curve.best, oracle_tied, cuts),
    )
    point = {p.module: p for p in curve.points}
    for pick in (picks.cui, picks.size, picks.oracle):
        pick.output_bytes = point[pick.module].output_bytes
    return correlations, picks
