"""A sweep's outputs, generated from its ``result.json`` alone: the verdict, the Markdown
report, the plot, and where the files go."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from isplit import IsplitError
from isplit.experiment.claims import subset_accuracy
from isplit.experiment.schema import BudgetPicks, Pick, SubsetResult, SweepResult

UNTRAINED_GAP = 0.20  # median split accuracy this far below the unsplit model: the budget, not the cut, decided
SIGNIFICANCE = 0.05  # one-sided permutation p below this counts as evidence of a positive association


def signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _strength(rho: float) -> str:
    a = abs(rho)
    return "strong" if a >= 0.6 else "moderate" if a >= 0.3 else "weak"


def _std_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` test images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(n, 1))


BudgetComparison = Literal["won", "tied", "lost", "same cut", "not measured"]


def pick_noise(pick: Pick, n_test: int, seeds: int) -> float:
    """Standard error of a pick's mean accuracy: the test set's binomial error and the spread
    over ``seeds`` bottleneck trainings (standard error of their mean), combined."""
    assert pick.accuracy is not None
    seed_se = (pick.accuracy_sd or 0.0) / math.sqrt(max(seeds, 1))
    return math.sqrt(_std_error(pick.accuracy, n_test) ** 2 + seed_se**2)


def budget_comparison(row: BudgetPicks, n_test: int, seeds: int) -> BudgetComparison:
    """I-SPLIT's pick against the size baseline's inside one budget: *same cut*; *won*/*lost* when
    their measured accuracies differ by more than twice the combined standard error (test set
    and seeds); *tied* within that noise; *not measured* when either lacks a measurement."""
    cui, size = row.cui, row.size
    if cui is None or size is None or cui.accuracy is None or size.accuracy is None:
        return "not measured"
    if cui.module == size.module:
        return "same cut"
    gap = cui.accuracy - size.accuracy
    noise = math.hypot(pick_noise(cui, n_test, seeds), pick_noise(size, n_test, seeds))
    if abs(gap) <= 2 * noise:
        return "tied"
    return "won" if gap > 0 else "lost"


def _pm(pick: Pick | None) -> str:
    if pick is None:
        return "none"
    sd = f" ± {100 * pick.accuracy_sd:.1f}" if pick.accuracy_sd is not None else ""
    return f"`{pick.module}` {percent(pick.accuracy)}{sd}"


def budget_outcome(row: BudgetPicks, n_test: int, seeds: int = 1) -> str:
    """One line: the budgeted picks and how I-SPLIT's compares with the size baseline's."""
    outcome = budget_comparison(row, n_test, seeds)
    gap = ""
    if outcome in ("won", "lost", "tied"):
        assert row.cui and row.size and row.cui.accuracy is not None and row.size.accuracy is not None
        gap = f" ({100 * (row.cui.accuracy - row.size.accuracy):+.1f} points)"
    fallback = "" if row.cui_is_candidate else " (no local maximum fits: best CUI inside the budget)"
    return (
        f"head ≤ {row.budget:.0%} of the FLOPs: I-SPLIT {_pm(row.cui)}{fallback} vs size {_pm(row.size)} → "
        f"I-SPLIT {outcome}{gap}; best measured inside the budget {_pm(row.oracle)}"
    )


def budget_verdict(result: SweepResult) -> list[str]:
    """The headline: per head-FLOPs budget, did I-SPLIT's pick beat the size baseline's by more
    than the noise, tie, or lose (on the sweep's own target; the other target's picks after)."""
    rows = [r for r in result.budget_picks if r.target == result.curve.target]
    if not rows:
        return []
    seeds = result.parameters.seeds
    outcomes = [budget_comparison(r, result.test_images, seeds) for r in rows]
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in ("won", "tied", "lost", "same cut", "not measured")
                       if outcomes.count(o))  # fmt: skip
    lines = [
        f"**Under an edge budget** (head FLOPs ≤ {', '.join(f'{r.budget:.0%}' for r in rows)} of the network; "
        f"{seeds} seed(s) per cut, noise = test-set and seed standard error): I-SPLIT against the size baseline — "
        f"{counts}."
    ]
    lines += [budget_outcome(r, result.test_images, seeds) for r in rows]
    other = [r for r in result.budget_picks if r.target != result.curve.target]
    if other and result.other_curve is not None:
        differ = [
            f"{r.budget:.0%}: `{r.cui.module if r.cui else None}` vs `{o.cui.module if o.cui else None}`"
            for r, o in zip(rows, other, strict=False)
            if (r.cui and r.cui.module) != (o.cui and o.cui.module)
        ]
        best_differs = result.other_curve.best != result.curve.best
        lines.append(
            f"Targets: the `{result.other_curve.target}` curve (the authors' released code) "
            + (
                f"peaks at `{result.other_curve.best}` instead of `{result.curve.best}`"
                if best_differs
                else f"peaks at the same cut `{result.curve.best}`"
            )  # fmt: skip
            + (f"; budgeted picks differ at {'; '.join(differ)}." if differ else "; the budgeted picks are the same.")
        )
    return lines


def partial_verdict(result: SweepResult) -> list[str]:
    """What CUI carries beyond size (and depth): the partial rank correlations."""
    lines = []
    for pc in result.partial_correlations:
        if pc.rho is None:
            lines.append(f"Partial ρ given {' and '.join(pc.controls)}: undefined with n = {pc.n} cuts.")
            continue
        p = pc.p if pc.p is not None else 1.0
        meaning = (
            "CUI carries information about accuracy beyond"
            if pc.rho > 0 and p < SIGNIFICANCE
            else "no evidence that CUI adds to"
        )
        lines.append(
            f"Partial Spearman of accuracy with log10 CUI given {' and '.join(pc.controls)}: ρ = {pc.rho:+.2f} "
            f"(one-sided permutation p = {p:.3f}, n = {pc.n}): {meaning} {' and '.join(pc.controls)}."
        )
    return lines


def verdict(result: SweepResult) -> list[str]:
    """Plain-language conclusions derived from the numbers alone, headline first.

    Rules for the ranking claim (log10 CUI vs measured accuracy, Spearman, one-sided
    permutation p): *held* when ρ > 0 with p < 0.05 and ρ beats the size baseline's;
    *held only partly* when significant but no better than size; *not supported* when ρ > 0
    but p >= 0.05; *did not hold* when ρ <= 0, *contradicted* when moreover p >= 0.95
    (CUI ranks cuts against accuracy). Whatever the correlation, the result is
    *inconclusive* when the measured accuracies span less than twice the test-set standard
    error, or when the median split accuracy is more than 20 points below the unsplit model's
    (the bottlenecks did not train). Accuracy gaps below twice their standard error are
    called within noise.
    """
    cui, size = result.correlations["cui"], result.correlations["size"]
    n_test = result.test_images
    accs = [c.accuracy for c in result.cuts]
    spread = max(accs) - min(accs) if accs else 0.0
    se_mean = _std_error(sum(accs) / len(accs), n_test) if accs else 0.0
    noise_only = bool(accs) and spread < 2 * se_mean
    median = sorted(accs)[len(accs) // 2] if accs else 0.0
    untrained = bool(accs) and result.reference_accuracy - median > UNTRAINED_GAP
    lines: list[str] = budget_verdict(result)
    if cui.spearman is None or cui.n < 4:
        lines.append(f"**Not judged**: only {cui.n} cuts were measured (or accuracy did not vary); no ranking claim.")
    else:
        stats = (
            f"Spearman ρ = {cui.spearman:+.2f} (one-sided permutation p = {number(cui.spearman_p, 3)}), "
            f"Kendall τ = {signed(cui.kendall, 2)} (p = {number(cui.kendall_p, 3)}), n = {cui.n} cuts"
        )
        size_text = (
            f"the size baseline's ρ = {signed(size.spearman, 2)} (p = {number(size.spearman_p, 3)}), "
            f"τ = {signed(size.kendall, 2)}"
        )
        p = cui.spearman_p if cui.spearman_p is not None else 1.0
        significant = cui.spearman > 0 and p < SIGNIFICANCE
        beats_size = size.spearman is None or cui.spearman > size.spearman
        if noise_only:
            head = "**Inconclusive**: the cuts' measured accuracies are within test-set noise of each other"
        elif untrained:
            head = (
                f"**Inconclusive**: most bottlenecks did not train within the budget (median split accuracy "
                f"{percent(median)} against {percent(result.reference_accuracy)} unsplit), so the measurements say "
                "little about the cuts"
            )
        elif significant and beats_size:
            head = (
                f"**The claim held here ({_strength(cui.spearman)})**: log10 CUI ranks the cuts like their "
                "measured accuracy, better than layer size does"
            )
        elif significant:
            head = (
                "**The claim held only partly**: log10 CUI correlates with measured accuracy, but no better "
                "than layer size does"
            )
        elif cui.spearman > 0:
            head = (
                f"**The claim was not supported here**: the correlation is positive ({_strength(cui.spearman)}) "
                f"but not distinguishable from chance at n = {cui.n}"
            )
        elif p >= 1 - SIGNIFICANCE:
            head = "**The claim was contradicted here**: log10 CUI ranks the cuts against their measured accuracy"
        else:
            head = "**The claim did not hold here**: log10 CUI shows no positive association with measured accuracy"
        lines.append(f"{head} — {stats}; {size_text}.")
    picks = result.picks
    if picks.cui.accuracy is not None and picks.size.accuracy is not None and picks.oracle.accuracy is not None:
        gap = picks.cui.accuracy - picks.size.accuracy
        se = math.sqrt(_std_error(picks.cui.accuracy, n_test) ** 2 + _std_error(picks.size.accuracy, n_test) ** 2)
        if abs(gap) < 1e-12:
            compare = "the same as"
        else:
            noise = ", within test-set noise" if abs(gap) < 2 * se else ""
            compare = f"{abs(100 * gap):.1f} points {'above' if gap > 0 else 'below'}{noise},"
        lines.append(
            f"Picks: CUI's cut `{picks.cui.module}` measured {percent(picks.cui.accuracy)}, {compare} the size "
            f"baseline's `{picks.size.module}` ({percent(picks.size.accuracy)}); the best measured cut, "
            f"`{picks.oracle.module}`, reached {percent(picks.oracle.accuracy)} "
            f"({100 * (picks.oracle.accuracy - picks.cui.accuracy):.1f} points above CUI's pick)."
        )
    if accs:
        budget_note = (
            " The bottleneck budget was too small for most cuts to recover the model's accuracy: the ranking then "
            "reflects how fast each bottleneck trains as much as what its cut preserves."
            if result.reference_accuracy - median > 0.10
            else ""
        )
        lines.append(
            f"The unsplit model scores {percent(result.reference_accuracy)}; the split models {percent(min(accs))} to "
            f"{percent(max(accs))} (median {percent(median)}).{budget_note}"
        )
        if noise_only:
            lines.append(
                f"Caution: measured accuracies span only {100 * spread:.1f} points, less than twice the test-set "
                f"standard error ({100 * se_mean:.1f} points on {n_test} images): the ranking is mostly noise."
            )
        else:
            lines.append(
                f"Measured accuracies span {100 * spread:.1f} points across cuts "
                f"(test-set standard error ≈ {100 * se_mean:.1f} points on {n_test} images)."
            )
    control = result.size_control
    if control.agreement is not None:
        within = (
            f"among the {control.equal_size_pairs} pairs of measured cuts with equal output size, where size cannot "
            f"choose, CUI ordered {control.concordant} like their accuracy, {control.discordant} against it and "
            f"{control.tied} with an exact tie"
            if control.equal_size_pairs
            else "no two measured cuts have the same output size, so CUI was not tested where size cannot choose"
        )
        consequence = ""
        if control.agreement > 0.5:
            consequence = (
                ", so much of CUI's correlation may be size's"
                if (cui.spearman or 0) > 0
                else ", so this sweep can hardly tell them apart"
            )
        lines.append(
            f"CUI and size agree with each other at ρ = {control.agreement:+.2f} over these cuts{consequence}; {within}."
        )
    lines += partial_verdict(result)
    if result.subsets:
        margin = result.parameters.min_margin
        decisive = [s for s in result.subsets if s.decisive]
        near = [s for s in result.subsets if s.best_moved and not s.decisive]
        if decisive:
            lines.append(
                f"The predicted best cut moved decisively (by ≥ {margin} in log10 CUI) for {len(decisive)} of "
                f"{len(result.subsets)} class subsets: {_moves(decisive)}."
            )
        if near:
            lines.append(
                f"For {len(near)} subset(s) the best cut moved only within a near-tie (margin < {margin} in log10 "
                f"CUI, i.e. the curve's top is flat there): {_moves(near)}."
            )
        if not decisive and not near:
            lines.append("No class subset searched moved the predicted best cut away from the all-class best.")
        for s in result.subsets:
            lines.append(_subset_conclusion(s, result.test_class_counts))
    return lines


def _moves(subsets: Sequence[SubsetResult]) -> str:
    return "; ".join(
        f"{{{', '.join(s.class_names)}}}: `{s.all_class_best}` → `{s.best}` (margin {s.margin:.3f})" for s in subsets
    )


def _subset_conclusion(s: SubsetResult, test_counts: Sequence[int]) -> str:
    by_module = {m.module: m for m in s.measurements}
    label = "{" + ", ".join(s.class_names) + "}"
    own, shared = by_module.get(s.best), by_module.get(s.all_class_best)
    if not s.best_moved:
        return f"Subset {label}: its curve peaks at the all-class best `{s.best}`; nothing to compare."
    if own is None or shared is None:
        return f"Subset {label}: the retraining needed to compare `{s.best}` with `{s.all_class_best}` was not done."
    n = sum(test_counts[k] for k in s.classes)
    gap = own.accuracy - shared.accuracy
    se = math.sqrt(_std_error(own.accuracy, n) ** 2 + _std_error(shared.accuracy, n) ** 2)
    if abs(gap) < 2 * se:
        outcome = f"a difference of {100 * gap:+.1f} points, within test-set noise"
    elif gap > 0:
        outcome = f"{100 * gap:.1f} points better, as the subset curve predicts"
    else:
        outcome = f"{100 * -gap:.1f} points worse, against the subset curve's prediction"
    return (
        f"Subset {label}: with bottlenecks trained on its images, its own best cut `{s.best}` measured "
        f"{percent(own.accuracy)} vs {percent(shared.accuracy)} at the all-class best `{s.all_class_best}` — {outcome} "
        f"({n} test images)."
    )


def render_report(result: SweepResult, plot_name: str | None = None) -> str:
    """The Markdown report of a sweep, from its result alone."""
    p, m = result.parameters, result.model
    width = f", width {m.width}" if m.width != 1.0 else ""
    out = [f"# Does the CUI curve predict split accuracy? {m.arch}{width} on {p.dataset}", ""]
    out += ["## Verdict", ""] + [f"* {line}" for line in verdict(result)] + [""]
    out += [
        "The claim under test (METHOD.md): the I-SPLIT curve ranks cuts like their measured accuracy after a "
        "bottleneck is inserted and retrained, better than layer size does. The size baseline predicts that a "
        "smaller output is a better cut (predictor: −output bytes). p-values are one-sided permutation tests for a "
        f"positive association: at the {SIGNIFICANCE} level a Spearman ρ must exceed about 0.64 with n = 8 cuts and "
        "about 0.38 with n = 20. Each cut's bottleneck is trained with the sweep's seeds and the accuracy is their "
        "mean; one training budget.",
        "",
    ]
    if plot_name:
        out += [f"![CUI, size and measured accuracy per cut]({plot_name})", ""]
    if result.budget_picks:
        out += _budget_table(result)
    out += ["## Rank correlation with measured accuracy (all classes)", ""]
    out += ["| predictor | n | Spearman ρ | p (one-sided) | Kendall τ | p (one-sided) |", "|---|---|---|---|---|---|"]
    for key, label in (("cui", "log10 CUI (I-SPLIT)"), ("size", "−output bytes (size)")):
        c = result.correlations[key]
        out.append(
            f"| {label} | {c.n} | {signed(c.spearman)} | {number(c.spearman_p)} | {signed(c.kendall)} | "
            f"{number(c.kendall_p)} |"
        )
    out += ["", "## Picks", "", "| method | cut | output bytes/img | measured accuracy | below best measured |"]
    out.append("|---|---|---|---|---|")
    for pick in (result.picks.cui, result.picks.size, result.picks.oracle):
        below = (
            f"{100 * (result.picks.oracle.accuracy - pick.accuracy):.1f} pts"
            if pick.accuracy is not None and result.picks.oracle.accuracy is not None
            else "n/a"
        )
        tie = ""
        if pick.tied:
            tie = f" (tied with {', '.join(f'`{t}`' for t in pick.tied)}; mean of the tie {percent(pick.tie_mean_accuracy)})"
        label = {"cui": "I-SPLIT (max CUI)", "size": "size (smallest output)", "oracle": "best measured"}[pick.method]
        out.append(f"| {label} | `{pick.module}`{tie} | {pick.output_bytes} | {percent(pick.accuracy)} | {below} |")
    out += ["", "## Per cut (bottleneck trained on all classes)", ""]
    subset_heads = "".join(f" acc. on {{{','.join(map(str, s.classes))}}} |" for s in result.subsets)
    out.append(f"| # | cut | kind | output | bytes/img | code | log10 CUI | accuracy |{subset_heads} train s |")
    out.append("|---" * (9 + len(result.subsets)) + "|")
    for c in result.cuts:
        marks = "".join(
            mark
            for mark, module in (
                (" ★", result.picks.cui.module),
                (" ▼", result.picks.size.module),
                (" ✓", result.picks.oracle.module),
            )
            if c.module == module
        )
        subset_cells = "".join(
            f" {percent(subset_accuracy(c.per_class_accuracy, result.test_class_counts, s.classes))} |"
            for s in result.subsets
        )
        out.append(
            f"| {c.position} | `{c.module}`{marks} | {c.kind} | {'×'.join(map(str, c.output_shape))} | {c.output_bytes} | "
            f"{'×'.join(map(str, c.code_shape))} | {c.log10_cui:.3f} | {percent(c.accuracy)}{_sd(c.accuracy_sd)} |{subset_cells} "
            f"{c.training_seconds:.1f} |"
        )
    out += ["", "★ I-SPLIT's pick, ▼ the size baseline's pick, ✓ the best measured cut.", ""]
    if result.subsets:
        out += ["## Class subsets", ""]
        for s in result.subsets:
            label = ", ".join(n if n == str(k) else f"{k} {n}" for k, n in zip(s.classes, s.class_names, strict=True))
            moved = (
                f"moved {'' if s.decisive else 'within a near-tie '}from `{s.all_class_best}` to `{s.best}`"
                if s.best_moved
                else f"stayed at `{s.best}`"
            )
            out += [
                f"### Classes {label} ({s.chosen})",
                "",
                f"Curve from {s.analysis_images} analysed images; predicted best cut {moved} "
                f"(margin {s.margin:+.3f} in log10 CUI); candidates: {', '.join(f'`{c}`' for c in s.candidates)}.",
                "",
                _subset_conclusion(s, result.test_class_counts),
                "",
            ]
            c = s.correlation_all_class_bottlenecks
            out += [
                f"Subset CUI vs subset accuracy of the all-class bottlenecks: Spearman ρ = {signed(c.spearman)} "
                f"(p = {number(c.spearman_p)}), Kendall τ = {signed(c.kendall)} (p = {number(c.kendall_p)}), n = {c.n}.",
                "",
            ]
            if s.measurements:
                out += [
                    "| cut | log10 CUI (subset) | acc., bottleneck trained on subset | acc., all-class bottleneck | "
                    "train images | train s |",
                    "|---|---|---|---|---|---|",
                ]
                for meas in s.measurements:
                    mark = (
                        " ★"
                        if meas.module == s.best
                        else " (all-class best)"
                        if meas.module == s.all_class_best
                        else ""
                    )
                    out.append(
                        f"| `{meas.module}`{mark} | {meas.log10_cui:.3f} | {percent(meas.accuracy)} | "
                        f"{percent(meas.accuracy_all_class_bottleneck)} | {meas.training_images} | "
                        f"{meas.training_seconds:.1f} |"
                    )
                out.append("")
    mc = result.machine
    out += [
        "## Setup",
        "",
        f"* Machine: {mc.platform}, {mc.cpu_count} CPUs ({mc.torch_threads} torch threads), torch {mc.torch}, "
        f"device `{mc.device}` ({mc.device_name}).",
        f"* Started {result.started_at}; wall time {result.wall_seconds:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.phase_seconds.items())
        + ").",
        f"* Model: {m.arch}{width}, {m.input_size} px, {m.in_channels} channel(s), trained {m.epochs} epoch(s) on "
        f"{m.extra.get('train_images', result.train_images)} images "
        f"({f'checkpoint {p.weights}' if p.weights else f'lr {p.lr_model}, batch {p.batch_size_model}'}); "
        f"accuracy without a split {percent(result.reference_accuracy)} on {result.test_images} test images.",
        f"* Bottleneck at each cut: ratio {p.ratio}, {p.epochs_bottleneck} epoch(s) on {result.bottleneck_images} "
        f"training images (lr {p.lr_bottleneck}, batch {p.batch_size_bottleneck}), original layers frozen; the "
        "same budget at every cut. Subset bottlenecks get as many training images of the subset's classes "
        "(from the whole training split), so the same number of steps; subset accuracy is the 10-way top-1 on the "
        "subset's test images.",
        f"* Importance: {result.curve.num_images} images of the {p.analysis_split} split, target = "
        f"{result.curve.target} (CUI involves no fitting, so sharing the test split with the accuracy measurement "
        "leaks nothing it could learn from).",
        f"* Cuts measured: {len(result.cuts)} of {sum(not q.skipped for q in result.curve.points)} non-skipped "
        f"cut points ({'all' if not (p.cuts or p.max_cuts) else 'given' if p.cuts else f'{p.max_cuts} spanning'})"
        + (
            "; added because a method picks them: "
            + ", ".join(f"`{c.module}`" for c in result.cuts if c.added_for_picks)
            if any(c.added_for_picks for c in result.cuts)
            else ""
        )
        + ".",
    ]
    if result.skipped_for_budget:
        out.append(f"* Skipped for the time budget: {', '.join(result.skipped_for_budget)}.")
    out += [f"* {note}." for note in result.notes]
    out += ["", "Command:", "", "```", result.command, "```", ""]
    return "\n".join(out)


def _sd(sd: float | None) -> str:
    return f" ± {100 * sd:.1f}" if sd is not None else ""


def _budget_table(result: SweepResult) -> list[str]:
    """The headline table: per target and head-FLOPs budget, each method's pick and accuracy."""
    seeds, n = result.parameters.seeds, result.test_images
    out = [
        "## Under an edge budget (headline)",
        "",
        f"Accuracy = mean over {seeds} bottleneck seed(s) ± their standard deviation; ± SE = the standard error used to "
        f"judge a gap (test set of {n} images and seeds); a gap beyond 2 SE counts.",
        "",
        "| target | head FLOPs ≤ | I-SPLIT pick | acc. | size pick | acc. | best measured | acc. | I-SPLIT vs size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(pick: Pick | None) -> str:
        if pick is None:
            return "none | n/a"
        sd = f" ± {100 * pick.accuracy_sd:.1f}" if pick.accuracy_sd is not None else ""
        se = f" (SE {100 * pick_noise(pick, n, seeds):.1f})" if pick.accuracy is not None else ""
        return f"`{pick.module}` | {percent(pick.accuracy)}{sd}{se}"

    for row in result.budget_picks:
        mark = "" if row.cui_is_candidate else " †"
        out.append(
            f"| {row.target} | {row.budget:.0%} | {cell(row.cui)}{mark} | {cell(row.size)} | {cell(row.oracle)} | "
            f"{budget_comparison(row, n, seeds)} |"
        )
    out += ["", "† no local maximum of the curve fits the budget: the cut with the highest CUI inside it.", ""]
    if result.partial_correlations:
        out += [
            "## What CUI adds beyond size",
            "",
            "| controls | n | partial Spearman ρ | p (one-sided) |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {' + '.join(pc.controls)} | {pc.n} | {signed(pc.rho)} | {number(pc.p)} |"
            for pc in result.partial_correlations
        ]
        out.append("")
    return out


def output_paths(out: Path, prefix: str = "") -> dict[str, Path]:
    """Where a sweep's files go: ``{out}/{prefix}result.json``, ``report.md``, ``sweep.png``."""
    return {
        "result": out / f"{prefix}result.json",
        "report": out / f"{prefix}report.md",
        "plot": out / f"{prefix}sweep.png",
    }


def write_outputs(result: SweepResult, out: Path, prefix: str = "") -> dict[str, Path]:
    """Write the result JSON, then the plot and report generated from it; returns what was written."""
    paths = output_paths(out, prefix)
    out.mkdir(parents=True, exist_ok=True)
    paths["result"].write_text(result.model_dump_json(indent=1, by_alias=True) + "\n")
    return {"result": paths["result"], **write_report(paths["result"], out, prefix)}


def read_result(path: Path) -> SweepResult:
    """Load and validate a sweep's ``result.json``."""
    if not path.is_file():
        raise IsplitError(f"result file {path} does not exist")
    try:
        return SweepResult.model_validate_json(path.read_text())
    except ValueError as exc:
        raise IsplitError(f"{path} is not a sweep result: {' '.join(str(exc).split())[:300]}") from exc


def write_report(result_path: Path, out: Path | None = None, prefix: str | None = None) -> dict[str, Path]:
    """Generate the plot and Markdown report from a result JSON (beside it by default)."""
    result = read_result(result_path)
    out = out or result_path.parent
    if prefix is None:
        prefix = result_path.name.removesuffix("result.json") if result_path.name.endswith("result.json") else ""
    paths = output_paths(out, prefix)
    written: dict[str, Path] = {}
    try:
        from isplit.plots import plot_sweep  # matplotlib, an optional dependency here
    except ImportError:
        plot = None
    else:
        plot = plot_sweep(result, paths["plot"])
    if plot is not None:
        written["plot"] = plot
    paths["report"].write_text(render_report(result, paths["plot"].name if plot is not None else None))
    written["report"] = paths["report"]
    return written
