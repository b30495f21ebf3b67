"""``isplit experiment sweep|report``: a tiny sweep on digits, and the pure pieces it is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isplit.checkpoint import ModelInfo
from isplit.cuts import CutPoint, find_cut_points
from isplit.data import load_dataset
from isplit.experiment import (
    BudgetPicks,
    CutMeasurement,
    Pick,
    SweepResult,
    choose_cuts,
    permutation_p,
    render_report,
    size_control,
    spanning_order,
    subset_search,
    verdict,
)
from isplit.experiment.claims import budget_picks, partial_correlations
from isplit.experiment.report import budget_comparison
from isplit.importance import ImportanceStats, curve_from_stats
from isplit.messages import BottleneckSpec
from isplit.retrain import retrain_split
from isplit.stats import kendall, partial_spearman, spearman
from isplit.zoo import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CUTS = ("features.0", "features.8", "features.20")  # features.20: the size pick (smallest, earliest)


def isplit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isplit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=1200
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, SweepResult, subprocess.CompletedProcess[str]]:
    """One tiny sweep: narrow VGG11 at 32 px on 200 digits, 3 cuts (+ the picks'), 2 seeds of 1
    bottleneck epoch on 128 images, budgets of 10 % and 50 % of the FLOPs."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    done = isplit(
        "experiment", "sweep", "--arch", "vgg11", "--width", "0.25", "--dataset", "digits",
        "--input-size", "32", "--seeds", "2", "--budgets", "0.1,0.5",
        "--epochs-model", "2", "--epochs-bottleneck", "1", "--max-train-images", "200",
        "--bottleneck-images", "128", "--max-test-images", "100", "--analysis-images", "100",
        "--cuts", ",".join(CUTS), "--subset-cuts", "2", "--permutations", "200", "--device", "cpu",
        "--out", str(out),
        cwd=out.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, SweepResult.model_validate_json((out / "result.json").read_text()), done


def test_sweep_writes_result_report_plot_and_checkpoint(sweep):
    out, _, _ = sweep
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "report.md", "result.json", "sweep.png"]
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)


def test_result_json_records_machine_command_and_parameters(sweep):
    out, result, _ = sweep
    raw = json.loads((out / "result.json").read_text())
    assert raw["schema"] == "isplit-sweep/1"
    assert result.command.startswith("isplit experiment sweep --arch vgg11")
    assert result.machine.device == "cpu" and result.machine.torch == torch.__version__
    assert result.wall_seconds > 0 and set(result.phase_seconds) >= {"model", "importance", "retrain_all_classes"}
    p = result.parameters
    assert (p.arch, p.width, p.dataset, p.cuts, p.epochs_bottleneck) == ("vgg11", 0.25, "digits", list(CUTS), 1)
    assert (result.train_images, result.bottleneck_images, result.test_images) == (200, 128, 100)


def test_every_requested_cut_and_both_picks_are_measured_with_the_same_budget(sweep):
    _, result, _ = sweep
    measured = [c.module for c in result.cuts]
    assert set(CUTS) <= set(measured)
    assert {result.picks.cui.module, result.picks.size.module} <= set(measured)
    assert [c.position for c in result.cuts] == sorted(c.position for c in result.cuts)
    for c in result.cuts:
        assert 0 <= c.accuracy <= 1 and c.training_seconds > 0
        assert c.log10_cui == result.curve.point(c.module).log10_cui
        assert c.added_for_picks == (c.module not in CUTS)
        assert len(c.per_class_accuracy) == 10


def test_per_class_accuracy_agrees_with_the_overall_accuracy(sweep):
    _, result, _ = sweep
    counts = result.test_class_counts
    for c in result.cuts:
        overall = sum((a or 0) * n for a, n in zip(c.per_class_accuracy, counts, strict=True)) / sum(counts)
        assert overall == pytest.approx(c.accuracy, abs=1e-9)


def test_correlations_are_isplit_stats_of_the_measured_cuts(sweep):
    _, result, _ = sweep
    acc = [c.accuracy for c in result.cuts]
    cui = [c.log10_cui for c in result.cuts]
    size = [-float(c.output_bytes) for c in result.cuts]
    for key, predictor in (("cui", cui), ("size", size)):
        corr = result.correlations[key]
        assert corr.n == len(result.cuts)
        assert corr.spearman == spearman(predictor, acc)
        assert corr.kendall == kendall(predictor, acc)


def test_size_control_is_recorded(sweep):
    _, result, _ = sweep
    assert result.size_control == size_control(result.cuts)


def test_picks_are_the_cui_maximum_the_smallest_output_and_the_best_measured(sweep):
    _, result, _ = sweep
    active = [p for p in result.curve.points if not p.skipped]
    assert result.picks.cui.module == result.curve.best == max(active, key=lambda p: p.log10_cui).module
    assert result.picks.size.output_bytes == min(p.output_bytes for p in active)
    assert result.picks.oracle.accuracy == max(c.accuracy for c in result.cuts)
    by_module = {c.module: c.accuracy for c in result.cuts}
    assert result.picks.cui.accuracy == by_module[result.picks.cui.module]
    assert result.picks.size.accuracy == by_module[result.picks.size.module]


def test_subsets_are_searched_retrained_and_measured_on_their_classes(sweep):
    _, result, _ = sweep
    assert len(result.subsets) == 2
    for s in result.subsets:
        assert s.chosen == "auto" and len(s.classes) in (2, 3)
        assert s.best_moved == (s.best != result.curve.best)
        assert s.decisive == (s.best_moved and s.margin >= result.parameters.min_margin)
        assert 1 <= len(s.measurements) <= 2 and s.measurements[0].module in (s.best, s.all_class_best)
        assert all(0 <= m.accuracy <= 1 for m in s.measurements)
        assert len(s.log10_cui) == len(result.curve.points)


def test_report_states_the_verdict_correlations_and_picks(sweep):
    out, result, done = sweep
    report = (out / "report.md").read_text()
    assert report.startswith("# Does the CUI curve predict split accuracy? vgg11")
    assert "## Verdict" in report and "claim" in report
    assert f"n = {result.correlations['cui'].n}" in report or "Not judged" in report
    assert f"`{result.picks.cui.module}`" in report and f"`{result.picks.size.module}`" in report
    assert "![CUI, size and measured accuracy per cut](sweep.png)" in report
    assert result.command in report
    assert "cui pick" in done.stdout and "size pick" in done.stdout


def test_report_command_regenerates_the_same_report_from_the_json(sweep, tmp_path):
    """Through ``python -m isplit.experiment``, the entry point for machines without the full CLI."""
    out, _, _ = sweep
    done = subprocess.run(
        [sys.executable, "-m", "isplit.experiment", "report", str(out / "result.json"), "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)


def test_an_unknown_cut_is_a_one_line_error(tmp_path):
    done = isplit(
        "experiment", "sweep", "--arch", "vgg11", "--width", "0.25", "--dataset", "digits", "--epochs-model", "1",
        "--max-train-images", "50", "--analysis-images", "50", "--cuts", "features.0,nope", "--out", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "'nope' is not a non-skipped cut point" in done.stderr


def test_weights_that_contradict_the_given_width_are_a_one_line_error(sweep, tmp_path):
    out, _, _ = sweep
    done = isplit(
        "experiment", "sweep", "--arch", "vgg11", "--width", "0.5", "--dataset", "digits",
        "--weights", str(out / "model.pt"), "--out", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--width 0.5 contradicts the checkpoint" in done.stderr


def test_report_of_a_file_that_is_not_a_result_is_a_one_line_error(tmp_path):
    (tmp_path / "result.json").write_text('{"hello": 1}')
    done = isplit("experiment", "report", str(tmp_path / "result.json"), cwd=tmp_path)
    assert done.returncode == 2 and "is not a sweep result" in done.stderr


def test_retraining_a_cut_leaves_the_reference_model_unchanged():
    """Every cut of a sweep retrains against the same model: BatchNorm statistics must not drift."""
    model = build_model("vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.25).eval()
    info = ModelInfo(
        arch="vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.25,
        class_names=[str(k) for k in range(10)], mean=[0.3], std=[0.4],
    )  # fmt: skip
    data = load_dataset("digits", "test").subset(None, 64)
    cut = next(p.module for p in find_cut_points(model, (1, 32, 32)) if not p.skipped)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retrain_split(model, info, cut, data, data, BottleneckSpec(epochs=1, batch_size=32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


# -- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 8, 21])
def test_spanning_order_visits_every_index_once_ends_first(n):
    order = spanning_order(n)
    assert sorted(order) == list(range(n))
    assert order[: min(n, 2)] == [0, n - 1][: min(n, 2)]


def test_spanning_order_prefix_covers_the_middle_early():
    assert spanning_order(9)[:3] == [0, 8, 4]


def test_choose_cuts_spans_the_network_evenly_and_keeps_network_order():
    active = [f"l{i}" for i in range(21)]
    assert choose_cuts(active, None, 5) == ["l0", "l5", "l10", "l15", "l20"]
    assert choose_cuts(active, None, None) == active
    assert choose_cuts(active, ["l7", "l2"], None) == ["l2", "l7"]


def test_permutation_p_is_exact_for_small_n():
    x = [1.0, 2.0, 3.0, 4.0]
    assert permutation_p(spearman, x, [10.0, 20.0, 30.0, 40.0], permutations=0, seed=0) == pytest.approx(1 / 24)
    assert permutation_p(spearman, x, [40.0, 30.0, 20.0, 10.0], permutations=0, seed=0) == 1.0


def test_permutation_p_by_monte_carlo_is_small_for_a_perfect_ranking():
    x = [float(i) for i in range(12)]
    p = permutation_p(kendall, x, x, permutations=500, seed=0)
    assert p == pytest.approx(1 / 501)


def _cut(module: str, output_bytes: int, log10_cui: float, accuracy: float) -> CutMeasurement:
    return CutMeasurement(
        module=module, kind="Conv2d", position=0, output_shape=[output_bytes // 4], output_bytes=output_bytes,
        code_shape=[1], log10_cui=log10_cui, accuracy=accuracy, per_class_accuracy=[], training_seconds=1.0,
    )  # fmt: skip


def test_size_control_judges_cui_only_where_sizes_are_equal():
    cuts = [
        _cut("a", 400, -3.0, 0.60),
        _cut("b", 400, -2.0, 0.70),  # with a: CUI orders like accuracy
        _cut("c", 100, -1.0, 0.50),
        _cut("d", 100, -1.5, 0.90),  # with c: CUI orders against accuracy
        _cut("e", 100, -1.0, 0.80),  # with c: CUI tie; with d: against
    ]
    control = size_control(cuts)
    assert (control.equal_size_pairs, control.concordant, control.discordant, control.tied) == (4, 1, 2, 1)
    assert control.agreement == spearman([c.log10_cui for c in cuts], [-float(c.output_bytes) for c in cuts])


def _stats_with_class_peaks(peaks: list[int], num_points: int = 5) -> ImportanceStats:
    """Per-class sums where class k's curve peaks at point ``peaks[k]`` (1x1 maps, 1 image each)."""
    points = [
        CutPoint(module=f"p{i}", kind="Conv2d", skipped=False, output_shape=[1, 1, 1], output_bytes=4 * (10 - i))
        for i in range(num_points)
    ]
    sums = {p.module: torch.full((len(peaks), 1, 1), 1.0, dtype=torch.float64) for p in points}
    for k, peak in enumerate(peaks):
        sums[f"p{peak}"][k] = 1000.0
    return ImportanceStats(points, sums, torch.ones(len(peaks), dtype=torch.int64), "label")


def test_subset_search_finds_subsets_whose_best_cut_differs_from_the_all_class_best():
    stats = _stats_with_class_peaks([2, 2, 2, 1, 1, 3, 3])
    all_best = curve_from_stats(stats).best
    assert all_best == "p2"
    found = subset_search(stats, all_best, count=2)
    assert len(found) == 2
    bests = [curve.best for _, curve in found]
    assert "p2" not in bests and len(set(bests)) == 2  # two different moved peaks
    for classes, curve in found:
        assert curve.classes == classes


def test_subset_search_puts_decisive_moves_before_near_ties():
    stats = _stats_with_class_peaks([2, 2, 2, 1, 1, 3, 3])
    stats.sums["p3"][5:] = 1000.4  # classes 5 and 6 now prefer p3 over p2 by a hair only
    stats.sums["p2"][5:] = 1000.0
    found = subset_search(stats, "p2", count=8, min_margin=0.05)
    margins = [c.point(c.best).log10_cui - c.point("p2").log10_cui for _, c in found]
    decisive = [m >= 0.05 for m in margins]
    assert decisive[0] and decisive == sorted(decisive, reverse=True)
    assert any(c.best == "p3" for _, c in found)  # a near-tie still counts once decisive ones run out


def test_verdict_calls_accuracies_within_noise_inconclusive(sweep):
    _, result, _ = sweep
    flat = result.model_copy(deep=True)
    for cut in flat.cuts:
        cut.accuracy = 0.5
    flat.correlations["cui"] = flat.correlations["cui"].model_copy(update={"n": 8, "spearman": 0.9, "spearman_p": 0.01})
    assert _ranking_line(verdict(flat)).startswith("**Inconclusive**")


def test_verdict_says_not_judged_with_too_few_cuts(sweep):
    _, result, _ = sweep
    few = result.model_copy(deep=True)
    few.correlations["cui"] = few.correlations["cui"].model_copy(update={"n": 3})
    assert _ranking_line(verdict(few)).startswith("**Not judged**")


def test_verdict_calls_a_significant_ranking_that_beats_size_a_held_claim(sweep):
    _, result, _ = sweep
    good = result.model_copy(deep=True)
    for i, cut in enumerate(good.cuts):
        cut.accuracy = 0.5 + 0.1 * i  # well outside test-set noise
    good.correlations["cui"] = good.correlations["cui"].model_copy(
        update={"n": 10, "spearman": 0.9, "spearman_p": 0.001, "kendall": 0.8, "kendall_p": 0.001}
    )
    good.correlations["size"] = good.correlations["size"].model_copy(update={"spearman": 0.1})
    assert _ranking_line(verdict(good)).startswith("**The claim held here (strong)**")
    weak = good.model_copy(deep=True)
    weak.correlations["cui"] = weak.correlations["cui"].model_copy(update={"spearman": 0.4, "spearman_p": 0.2})
    assert _ranking_line(verdict(weak)).startswith("**The claim was not supported here**")
    assert "n = 10" in _ranking_line(verdict(weak))
    assert "The claim was not supported here" in render_report(weak)


def _ranking_line(lines: list[str]) -> str:
    """The verdict's line on the ranking claim (after the budgeted headline lines)."""
    return next(line for line in lines if line.startswith("**") and not line.startswith("**Under an edge budget"))


def test_every_cut_is_trained_once_per_seed_and_reports_the_mean_and_spread(sweep):
    _, result, _ = sweep
    for c in result.cuts:
        assert len(c.accuracies) == 2
        assert c.accuracy == pytest.approx(sum(c.accuracies) / 2)
        spread = abs(c.accuracies[0] - c.accuracies[1]) / 2**0.5  # sample sd of two values
        assert c.accuracy_sd == pytest.approx(spread)
    for s in result.subsets:
        assert all(len(m.accuracies) == 2 for m in s.measurements)


def test_budgeted_picks_stay_inside_the_budget_and_are_measured(sweep):
    _, result, _ = sweep
    fraction = result.head_flops_fraction
    assert {r.budget for r in result.budget_picks} == {0.1, 0.5}
    assert {r.target for r in result.budget_picks} == {"label", "predicted"}
    measured = {c.module: c for c in result.cuts}
    for row in result.budget_picks:
        curve = result.curve if row.target == result.curve.target else result.other_curve
        inside = [p for p in curve.points if not p.skipped and fraction[p.module] <= row.budget + 1e-9]
        assert row.cui and row.size, row
        assert fraction[row.cui.module] <= row.budget + 1e-9 and fraction[row.size.module] <= row.budget + 1e-9
        candidates = [p for p in inside if p.module in curve.candidates]
        expected = max(candidates or inside, key=lambda p: p.log10_cui)
        assert (row.cui.module, row.cui_is_candidate) == (expected.module, bool(candidates))
        assert row.size.output_bytes == min(p.output_bytes for p in inside)
        assert row.cui.module in measured and row.size.module in measured  # measured to be compared
        assert row.cui.accuracy == measured[row.cui.module].accuracy
        assert row.oracle.accuracy == max(measured[p.module].accuracy for p in inside if p.module in measured)
    assert result.budget_picks == budget_picks([result.curve, result.other_curve], result.cuts, fraction, [0.1, 0.5])


def test_the_other_target_curve_is_reported(sweep):
    out, result, _ = sweep
    assert result.curve.target == "label" and result.other_curve.target == "predicted"
    assert [p.module for p in result.other_curve.points] == [p.module for p in result.curve.points]
    assert "`predicted` curve" in (out / "report.md").read_text()


def test_partial_correlations_given_size_and_depth_are_recorded(sweep):
    out, result, _ = sweep
    assert [pc.controls for pc in result.partial_correlations] == [["size"], ["size", "depth"]]
    assert result.partial_correlations == partial_correlations(
        result.cuts, permutations=result.parameters.permutations, seed=result.parameters.seed
    )
    report = (out / "report.md").read_text()
    assert "## Under an edge budget (headline)" in report and "## What CUI adds beyond size" in report


def test_bad_budgets_are_a_one_line_error(tmp_path):
    done = isplit("experiment", "sweep", "--arch", "vgg11", "--dataset", "digits", "--budgets", "0.1,1.5",
                  "--out", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "each budget is a fraction in (0, 1]" in done.stderr
    assert "Traceback" not in done.stderr


def _pick(module: str, accuracy: float | None, sd: float | None = None) -> Pick:
    return Pick(method="cui", module=module, accuracy=accuracy, output_bytes=4, accuracy_sd=sd)


@pytest.mark.parametrize(
    ("cui", "size", "expected"),
    [
        (_pick("a", 0.90, 0.01), _pick("b", 0.80, 0.01), "won"),  # 10 points >> 2 SE (~2 points)
        (_pick("a", 0.80, 0.01), _pick("b", 0.90, 0.01), "lost"),
        (_pick("a", 0.85, 0.01), _pick("b", 0.84, 0.01), "tied"),  # 1 point < 2 SE
        (_pick("a", 0.90, 0.10), _pick("b", 0.80, 0.10), "tied"),  # seed spread makes 10 points noise
        (_pick("a", 0.85), _pick("a", 0.85), "same cut"),
        (_pick("a", None), _pick("b", 0.84), "not measured"),
        (None, _pick("b", 0.84), "not measured"),
    ],
)
def test_budget_comparison_calls_each_outcome(cui, size, expected):
    row = BudgetPicks(budget=0.25, target="label", cui=cui, size=size, oracle=None)
    assert budget_comparison(row, n_test=2000, seeds=3) == expected


def test_verdict_leads_with_the_budgeted_comparison(sweep):
    _, result, _ = sweep
    lines = verdict(result)
    assert lines[0].startswith("**Under an edge budget**")
    assert any(line.startswith("head ≤ 10% of the FLOPs: I-SPLIT") for line in lines)


def test_partial_spearman_separates_information_beyond_the_control():
    import random

    rng = random.Random(0)
    z = [rng.random() for _ in range(14)]
    x = [rng.random() for _ in range(14)]
    beyond = [a + b for a, b in zip(x, z, strict=True)]  # accuracy depends on x beyond z
    rho, p = partial_spearman(x, beyond, [z], permutations=2000, seed=0)
    assert rho > 0.6 and p < 0.01
    only_z = [b + 0.3 * rng.random() for b in z]  # accuracy is z's (and noise): x adds nothing
    rho, p = partial_spearman(x, only_z, [z], permutations=2000, seed=0)
    assert abs(rho) < 0.6 and p > 0.05
    assert partial_spearman(x[:3], beyond[:3], [z[:3]], permutations=10, seed=0) == (None, None)


def test_results_written_before_seeds_read_as_one_seed():
    path = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "vgg16bn-digits-cpu" / "result.json"
    raw = json.loads(path.read_text())
    assert "seeds" not in raw["parameters"]
    result = SweepResult.model_validate(raw)
    assert result.parameters.seeds == 1 and result.budget_picks == []
    assert render_report(result).startswith("# Does the CUI curve predict split accuracy?")


def test_a_resumed_sweep_keeps_the_earlier_cuts_and_trains_only_the_others(sweep, tmp_path):
    out, _, _ = sweep
    common = [
        "experiment", "sweep", "--arch", "vgg11", "--dataset", "digits", "--weights", str(out / "model.pt"),
        "--seeds", "1", "--bottleneck-images", "64", "--max-test-images", "100", "--analysis-images", "100",
        "--budgets", "0.5", "--num-subsets", "1", "--subset-cuts", "1", "--permutations", "200", "--device", "cpu",
    ]  # fmt: skip
    first = isplit(*common, "--cuts", "features.0", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    earlier = SweepResult.model_validate_json((tmp_path / "a" / "result.json").read_text())
    resume = ["--resume", str(tmp_path / "a" / "result.json")]
    second = isplit(*common, "--cuts", "features.0,features.8", *resume, "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    later = SweepResult.model_validate_json((tmp_path / "b" / "result.json").read_text())
    kept = {c.module: c for c in earlier.cuts}
    assert "features.8" not in kept and {c.module for c in later.cuts} == set(kept) | {"features.8"}
    for cut in later.cuts:  # the earlier measurements verbatim, training times included
        if cut.module in kept:
            assert cut == kept[cut.module]
    assert any(f"{len(kept)} cut(s) measured there were kept" in n for n in later.notes)
    # Anything that changes a measurement refuses to mix: one line, exit 2.
    changed = [*common, "--seeds", "2"]  # the last --seeds wins
    refused = isplit(*changed, "--cuts", "features.8", *resume, "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "cannot resume: the earlier run measured differently (seeds 1 -> 2)" in refused.stderr
