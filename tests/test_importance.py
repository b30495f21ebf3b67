"""Importance curves: class subsets, candidates, the size baseline, ranking, JSON."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from isplit import IsplitError
from isplit.cuts import CutPoint
from isplit.data import load_dataset
from isplit.importance import (
    FIRST_STEP_IMAGES,
    ImportanceCurve,
    ImportanceStats,
    accumulate_importance,
    curve_from_stats,
    importance_curve,
    local_maxima,
)
from isplit.zoo import build_model

SUBSET = [1, 7]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=0.125)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """60 digits test images at 32 px, normalised, with labels."""
    data = load_dataset("digits", "test").subset(None, 60)
    return next(data.batches(60, input_size=32, mean=[0.3], std=[0.4]))


@pytest.fixture(scope="module")
def all_stats(model, digits) -> ImportanceStats:
    return accumulate_importance(model, digits, batch_size=32, device="cpu")


@pytest.fixture(scope="module")
def subset_curve(model, digits) -> ImportanceCurve:
    return importance_curve(model, digits, batch_size=32, device="cpu", classes=SUBSET)


# -- class subsets --------------------------------------------------------------------------


def test_subset_analysis_sees_only_images_of_those_classes(model, digits):
    _, labels = digits
    stats = accumulate_importance(model, digits, batch_size=32, device="cpu", classes=SUBSET)
    expected = torch.bincount(labels, minlength=10)
    expected[[c for c in range(10) if c not in SUBSET]] = 0
    assert stats.counts.tolist() == expected.tolist()
    assert expected.sum() > 0


def test_subset_curve_records_its_classes_and_image_count(subset_curve, digits):
    _, labels = digits
    assert subset_curve.classes == SUBSET
    assert subset_curve.num_images == int(torch.isin(labels, torch.tensor(SUBSET)).sum())


def test_subset_curve_has_a_per_class_curve_for_each_analysed_class(subset_curve, digits):
    _, labels = digits
    assert sorted(subset_curve.per_class, key=int) == [str(c) for c in SUBSET]
    for c in SUBSET:
        per_class = subset_curve.per_class[str(c)]
        assert per_class.classes == [c]
        assert per_class.num_images == int((labels == c).sum())
        assert len(per_class.log10_cui) == len(subset_curve.points)


def test_full_analysis_has_a_per_class_curve_for_every_class_present(all_stats, digits):
    _, labels = digits
    curve = curve_from_stats(all_stats)
    assert set(curve.per_class) == {str(int(c)) for c in labels.unique()}
    assert curve.classes is None
    assert curve.num_images == len(labels)


def test_subset_curve_equals_the_all_images_stats_restricted_to_the_subset(subset_curve, all_stats):
    restricted = curve_from_stats(all_stats, SUBSET)
    assert restricted.classes == subset_curve.classes
    assert restricted.num_images == subset_curve.num_images
    assert [p.module for p in restricted.points] == [p.module for p in subset_curve.points]
    for a, b in zip(restricted.points, subset_curve.points, strict=True):
        assert a.cui == pytest.approx(b.cui, rel=1e-5, abs=1e-30)
    assert restricted.candidates == subset_curve.candidates
    assert restricted.best == subset_curve.best
    for c in SUBSET:
        assert restricted.per_class[str(c)].log10_cui == pytest.approx(
            subset_curve.per_class[str(c)].log10_cui, abs=1e-5
        )


def test_one_class_curve_equals_the_per_class_entry_of_the_full_analysis(all_stats):
    full = curve_from_stats(all_stats)
    only_seven = curve_from_stats(all_stats, [7])
    assert [p.log10_cui for p in only_seven.points] == full.per_class["7"].log10_cui
    assert only_seven.best == full.per_class["7"].best
    assert only_seven.candidates == full.per_class["7"].candidates


def test_subset_without_images_is_an_error(model, digits):
    images, labels = digits
    keep = labels != 3
    with pytest.raises(IsplitError, match="no images"):
        accumulate_importance(model, (images[keep], labels[keep]), device="cpu", classes=[3])


def test_curve_for_classes_absent_from_the_stats_is_an_error(model, digits):
    stats = accumulate_importance(model, digits, batch_size=32, device="cpu", classes=SUBSET)
    with pytest.raises(IsplitError, match=r"\[3\]"):
        curve_from_stats(stats, [3])
    with pytest.raises(IsplitError):
        curve_from_stats(stats, [])


def test_class_index_out_of_range_is_an_error(all_stats):
    with pytest.raises(IsplitError, match="12"):
        all_stats.cui([12])


# -- candidates and best --------------------------------------------------------------------


def _point(name: str, nbytes: int, skipped: bool = False) -> CutPoint:
    return CutPoint(module=name, kind="ReLU" if skipped else "Conv2d", skipped=skipped, output_shape=[nbytes // 4],
                    output_bytes=nbytes)  # fmt: skip


def _stats(values: dict[str, float], nbytes: dict[str, int], skipped: set[str]) -> ImportanceStats:
    """Stats over one image of class 0 whose every map is a 1x1 map of the given CUI."""
    points = [_point(name, nbytes[name], name in skipped) for name in values]
    sums = {name: torch.full((1, 1, 1), v, dtype=torch.float64) for name, v in values.items()}
    return ImportanceStats(points, sums, torch.tensor([1]), "label")


VALUES = {"a": 1e-3, "b": 1e-1, "relu_b": 1e5, "c": 1e-2, "d": 1e1, "e": 1.0}
BYTES = {"a": 4000, "b": 400, "relu_b": 400, "c": 4000, "d": 40, "e": 400}


def test_candidates_are_local_maxima_of_the_curve_without_skipped_points():
    curve = curve_from_stats(_stats(VALUES, BYTES, skipped={"relu_b"}))
    # non-skipped log10 curve: a=-3, b=-1, c=-2, d=1, e=0 -> maxima at b and d.
    assert curve.candidates == ["b", "d"]
    assert curve.best == "d"  # the skipped point's higher value plays no part


def test_skipped_points_stay_in_the_curve_flagged():
    curve = curve_from_stats(_stats(VALUES, BYTES, skipped={"relu_b"}))
    assert [p.module for p in curve.points] == list(VALUES)
    assert curve.point("relu_b").skipped
    assert curve.point("relu_b").log10_cui == pytest.approx(5.0)


def test_best_is_the_global_maximum_even_at_the_end_of_the_curve():
    curve = curve_from_stats(_stats({"a": 1.0, "b": 0.1, "c": 10.0}, {"a": 4, "b": 4, "c": 4}, skipped=set()))
    assert curve.candidates == []
    assert curve.best == "c"


def test_candidates_and_best_of_a_real_model(all_stats):
    curve = curve_from_stats(all_stats)
    active = [p for p in curve.points if not p.skipped]
    values = [p.log10_cui for p in active]
    assert curve.candidates == [active[i].module for i in local_maxima(values)]
    assert curve.best == active[values.index(max(values))].module


def test_size_ranking_orders_non_skipped_cuts_by_output_bytes():
    curve = curve_from_stats(_stats(VALUES, BYTES, skipped={"relu_b"}))
    assert curve.size_ranking == ["d", "b", "e", "a", "c"]  # ties keep network order


def test_size_ranking_of_a_real_model(all_stats):
    curve = curve_from_stats(all_stats)
    sizes = [curve.point(m).output_bytes for m in curve.size_ranking]
    assert sizes == sorted(sizes)
    assert set(curve.size_ranking) == {p.module for p in curve.points if not p.skipped}


def test_ranking_puts_candidates_first_then_the_rest_by_cui():
    curve = curve_from_stats(_stats(VALUES, BYTES, skipped={"relu_b"}))
    # candidates d (10) and b (0.1) first, then e (1), c (0.01), a (0.001).
    assert curve.ranking() == ["d", "b", "e", "c", "a"]


def test_ranking_starts_with_the_recommended_cut_even_when_it_is_not_a_local_maximum():
    curve = curve_from_stats(_stats({"a": 1.0, "b": 2.0, "c": 0.5, "d": 10.0}, {k: 4 for k in "abcd"}, skipped=set()))
    assert curve.best == "d" and curve.candidates == ["b"]
    assert curve.ranking() == ["d", "b", "a", "c"]


def test_point_lookup_of_an_unknown_module_raises_key_error():
    curve = curve_from_stats(_stats(VALUES, BYTES, skipped=set()))
    with pytest.raises(KeyError):
        curve.point("nope")


# -- JSON -----------------------------------------------------------------------------------


def test_curve_survives_a_json_round_trip(all_stats):
    curve = curve_from_stats(all_stats, SUBSET)
    assert ImportanceCurve.model_validate_json(curve.model_dump_json()) == curve


def test_curve_with_a_zero_cui_layer_is_valid_json():
    values = {"a": 0.0, "b": 1.0, "c": 0.5}
    curve = curve_from_stats(_stats(values, {k: 4 for k in values}, skipped=set()))
    text = curve.model_dump_json()
    assert "Infinity" not in text and "NaN" not in text
    assert ImportanceCurve.model_validate_json(text).point("a").log10_cui == curve.point("a").log10_cui


def test_the_first_step_is_small_for_quick_progress_and_changes_no_sum(model, digits, all_stats):
    seen: list[int] = []
    stats = accumulate_importance(model, digits, batch_size=64, device="cpu", progress=seen.append)
    n = len(digits[1])
    assert seen[0] == FIRST_STEP_IMAGES and seen[1] == min(64, n) and seen[-1] == n
    for name, sums in all_stats.sums.items():  # batches of 32, also split: per-image maps add the same
        assert torch.allclose(stats.sums[name], sums, rtol=1e-9, atol=1e-12), name
    assert torch.equal(stats.counts, all_stats.counts)


def test_channels_last_on_cpu_gives_the_same_sums_and_restores_the_layout(model, digits, all_stats):
    from isplit.importance import _accumulate_batch, _empty_stats, analysis_mode, channels_last, find_cut_points

    images, labels = digits
    plain = _empty_stats(model, find_cut_points(model, tuple(images.shape[1:])), tuple(images.shape[1:]),
                         torch.device("cpu"), "label")  # fmt: skip
    with analysis_mode(model):  # the plain layout, batch by batch, as before channels-last
        for i in range(0, len(labels), 32):
            _accumulate_batch(model, plain, images[i : i + 32], labels[i : i + 32], "label", None)
    for name, sums in all_stats.sums.items():
        assert torch.allclose(plain.sums[name], sums, rtol=1e-5, atol=1e-9), name
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() for p in weights)  # restored after each analysis
    with channels_last(model) as last:
        assert last and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.is_contiguous() for p in weights)
