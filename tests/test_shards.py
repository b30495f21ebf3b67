"""Sharded analyses (isplit.shards): shards cover the selection exactly once, their stats
files are safe and checked, and merged shards give the one-piece curve on a VGG and a ResNet,
including shards that hold no image of some class. Real models, real image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isplit import IsplitError
from isplit.analysis import AnalysisResult, result_from_stats, run_analysis
from isplit.checkpoint import ModelInfo, save_checkpoint
from isplit.cli import main as cli_main
from isplit.data import load_dataset
from isplit.shards import (
    ShardStats,
    load_stats,
    merge,
    run_shard,
    save_stats,
    shard_bounds,
)
from isplit.zoo import build_model

PER_CLASS = 8  # test images per class in the image folder: 80 in all
MODELS = {"vgg": ("vgg11_bn", 0.125), "resnet": ("resnet18", 1.0)}


# -- fixtures: an image folder ordered by class, and two small models -----------------------


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Digits as PNG class folders. Images load class by class, so contiguous shards hold
    only some of the classes."""
    root = tmp_path_factory.mktemp("digit-folder")
    data = load_dataset("digits", "train")
    for split in ("train", "test"):
        for c in range(10):
            (root / split / f"d{c}").mkdir(parents=True)
            idx = (data.labels == c).nonzero().flatten()[:PER_CLASS]
            for i in idx.tolist():
                Image.fromarray(data.images[i, 0].numpy()).save(root / split / f"d{c}" / f"{i}.png")
    return f"imagefolder:{root}"


def _checkpoint(path: Path, arch: str, width: float, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, in_channels=1, input_size=32, width=width)
    info = ModelInfo(arch=arch, num_classes=10, in_channels=1, input_size=32, width=width,
                     class_names=[f"d{c}" for c in range(10)], mean=[0.3], std=[0.3])  # fmt: skip
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="module", params=sorted(MODELS))
def weights(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, width = MODELS[request.param]
    return _checkpoint(tmp_path_factory.mktemp("shard-models") / f"{request.param}.pt", arch, width)


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("shard-vgg") / "vgg.pt", *MODELS["vgg"])


def _shards(weights: Path, dataset: str, count: int, **kw) -> list[ShardStats]:
    kw = {"batch_size": 16, "max_images": None, "device": "cpu", **kw}
    return [run_shard(weights, dataset, index=i, count=count, **kw) for i in range(count)]


def _assert_same_result(merged: AnalysisResult, whole: AnalysisResult, rel: float = 1e-4) -> None:
    assert merged.curve.num_images == whole.curve.num_images
    for a, b in zip(merged.curve.points, whole.curve.points, strict=True):
        assert a.module == b.module
        assert a.cui == pytest.approx(b.cui, rel=rel, abs=1e-30), a.module
    assert merged.curve.candidates == whole.curve.candidates
    assert merged.curve.best == whole.curve.best
    assert merged.ranking == whole.ranking
    assert merged.curve.per_class.keys() == whole.curve.per_class.keys()
    for k, curve in whole.curve.per_class.items():
        assert merged.curve.per_class[k].best == curve.best
        assert merged.curve.per_class[k].num_images == curve.num_images
    assert merged.costs == whole.costs
    assert (merged.model, merged.dataset, merged.classes) == (whole.model, whole.dataset, whole.classes)


# -- shard bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 7, 64, 120, 1000])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
@pytest.mark.parametrize("align", [1, 16, 64])
def test_shards_never_overlap_and_cover_the_selection_exactly(total, count, align):
    if total < count:
        with pytest.raises(IsplitError, match="at least one image"):
            shard_bounds(total, count, 0, align=align)
        return
    bounds = [shard_bounds(total, count, i, align=align) for i in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    assert all(stop > start for start, stop in bounds), bounds
    assert bounds == [shard_bounds(total, count, i, align=align) for i in range(count)]


def test_shard_boundaries_fall_on_batch_boundaries_when_possible():
    assert [shard_bounds(120, 3, i, align=16) for i in range(3)] == [(0, 48), (48, 96), (96, 120)]
    # 3 aligned shards of 64 would leave the last empty: balanced instead
    assert [shard_bounds(120, 3, i, align=64) for i in range(3)] == [(0, 40), (40, 80), (80, 120)]


def test_bad_shard_requests_are_named():
    with pytest.raises(IsplitError, match="shard index 3 out of range 0..2"):
        shard_bounds(100, 3, 3)
    with pytest.raises(IsplitError, match="shards must be >= 1"):
        shard_bounds(100, 0, 0)


# -- merged shards equal the one-piece run ---------------------------------------------------


@pytest.fixture(scope="module")
def whole_runs() -> dict:
    """One-piece results by weights file, computed once per module."""
    return {}


@pytest.mark.parametrize("count", [1, 2, 3])
def test_merged_shards_give_the_one_piece_curve(weights, digit_folder, count, whole_runs):
    if weights not in whole_runs:
        whole_runs[weights] = run_analysis(weights, digit_folder, max_images=None, batch_size=16, device="cpu")
    whole = whole_runs[weights]
    shards = _shards(weights, digit_folder, count)
    merged = result_from_stats(merge(shards[::-1]))  # any order
    _assert_same_result(merged, whole)
    if count > 1:
        # contiguous shards of a class-ordered folder: some class has no image in some shard
        assert any((s.stats.counts == 0).any() for s in shards)
        assert all(int(s.stats.counts.sum()) > 0 for s in shards)


def test_unaligned_shards_agree_within_fp32_tolerance(vgg_weights, digit_folder):
    """Batch size 64 and 3 shards of 80 images: shards of 27, 27, 26, batches unlike the one-piece run."""
    whole = run_analysis(vgg_weights, digit_folder, max_images=None, batch_size=64, device="cpu")
    merged = result_from_stats(merge(_shards(vgg_weights, digit_folder, 3, batch_size=64)))
    _assert_same_result(merged, whole)


def test_merged_class_subset_equals_the_one_piece_subset(vgg_weights, digit_folder):
    whole = run_analysis(vgg_weights, digit_folder, classes=["d1", "d7"], max_images=None, batch_size=8, device="cpu")
    merged = result_from_stats(merge(_shards(vgg_weights, digit_folder, 2, classes=["d1", "d7"], batch_size=8)))
    _assert_same_result(merged, whole)
    assert merged.classes == [1, 7]


# -- stats files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_shards(vgg_weights, digit_folder) -> list[ShardStats]:
    return _shards(vgg_weights, digit_folder, 2)


def test_stats_round_trip_through_a_file(two_shards, tmp_path):
    path = tmp_path / "s.npz"
    save_stats(two_shards[1], path)
    back = load_stats(path)
    assert back.meta == two_shards[1].meta
    assert torch.equal(back.stats.counts, two_shards[1].stats.counts)
    for p in back.stats.points:
        assert torch.equal(back.stats.sums[p.module], two_shards[1].stats.sums[p.module])
    assert [p.name for p in (tmp_path).iterdir()] == ["s.npz"], "no temporary file left behind"


def test_a_stats_file_holding_a_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"meta.json": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(IsplitError, match="not an isplit stats file"):
        load_stats(path)


@pytest.mark.parametrize("damage", ["garbage", "no_meta", "bad_shape", "bad_counts", "extra"])
def test_damaged_stats_files_are_refused_with_the_file_named(two_shards, tmp_path, damage):
    good = tmp_path / "good.npz"
    save_stats(two_shards[0], good)
    arrays = dict(np.load(good, allow_pickle=False))
    module = two_shards[0].stats.points[0].module
    if damage == "no_meta":
        del arrays["meta.json"]
    elif damage == "bad_shape":
        arrays["sum:" + module] = arrays["sum:" + module][:, :1]
    elif damage == "bad_counts":
        arrays["counts"] = arrays["counts"] + 1
    elif damage == "extra":
        arrays["sum:nothing"] = np.zeros(3)
    bad = tmp_path / "bad.npz"
    if damage == "garbage":
        bad.write_bytes(b"not a zip file")
    else:
        np.savez(bad, **arrays)
    with pytest.raises(IsplitError, match="bad.npz"):
        load_stats(bad)


# -- mismatched stats are refused ------------------------------------------------------------


def test_merge_refuses_stats_of_another_model(two_shards, digit_folder, tmp_path):
    other = _checkpoint(tmp_path / "other.pt", *MODELS["vgg"], seed=1)
    theirs = _shards(other, digit_folder, 2)
    with pytest.raises(IsplitError, match="weights_sha256 differs"):
        merge([two_shards[0], theirs[1]])


def test_merge_refuses_another_target_or_selection(two_shards, vgg_weights, digit_folder):
    predicted = run_shard(vgg_weights, digit_folder, index=1, count=2, batch_size=16, max_images=None,
                          target="predicted", device="cpu")  # fmt: skip
    with pytest.raises(IsplitError, match="target differs"):
        merge([two_shards[0], predicted])
    fewer = run_shard(vgg_weights, digit_folder, index=1, count=2, batch_size=16, max_images=100, device="cpu")
    with pytest.raises(IsplitError, match="max_images differs"):
        merge([two_shards[0], fewer])


def test_merge_refuses_other_cut_points(two_shards):
    meta = two_shards[1].meta.model_copy(update={"points": two_shards[1].meta.points[1:]})
    with pytest.raises(IsplitError, match="cut points differ"):
        merge([two_shards[0], ShardStats(two_shards[1].stats, meta)])


def test_merge_refuses_a_missing_or_repeated_shard(two_shards):
    with pytest.raises(IsplitError, match="shard 1 of 2 missing"):
        merge([two_shards[0]])
    with pytest.raises(IsplitError, match="shard 0 given 2 times"):
        merge([two_shards[0], two_shards[0], two_shards[1]])
    with pytest.raises(IsplitError, match="merge all shards first"):
        result_from_stats(two_shards[0])


# -- the CLI ---------------------------------------------------------------------------------


def _curve(folder: Path) -> AnalysisResult:
    return AnalysisResult.model_validate_json((folder / "result.json").read_bytes())


def test_cli_shards_and_merge_write_the_one_piece_result(vgg_weights, digit_folder, tmp_path, capsys):
    common = ["--weights", str(vgg_weights), "--dataset", digit_folder, "--max-images", "80", "--batch-size", "16",
              "--device", "cpu"]  # fmt: skip
    assert cli_main(["analyze", *common, "--out", str(tmp_path / "whole")]) == 0
    assert cli_main(["analyze", *common, "--shards", "2", "--out", str(tmp_path / "two")]) == 0
    for i in range(3):  # one after the other, as an external scheduler would run them
        out = str(tmp_path / f"s{i}.npz")
        assert cli_main(["analyze", *common, "--shards", "3", "--shard-index", str(i), "--stats-out", out]) == 0
    stats = [str(tmp_path / f"s{i}.npz") for i in range(3)]
    assert cli_main(["analyze", "merge", "--stats", *stats, "--out", str(tmp_path / "merged")]) == 0
    whole = _curve(tmp_path / "whole")
    for name in ("two", "merged"):
        _assert_same_result(_curve(tmp_path / name), whole)
        assert (tmp_path / name / "curve.png").stat().st_size > 0
        assert (tmp_path / name / "classes.png").stat().st_size > 0


def test_cli_shard_index_comes_from_the_indexed_job_environment(vgg_weights, digit_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    out = tmp_path / "s.npz"
    args = ["analyze", "--weights", str(vgg_weights), "--dataset", digit_folder, "--max-images", "80",
            "--batch-size", "16", "--device", "cpu", "--shards", "2", "--stats-out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    assert (load_stats(out).meta.index, load_stats(out).meta.count) == (1, 2)


def test_cli_merge_of_mismatched_stats_exits_2_with_one_line(two_shards, vgg_weights, digit_folder, tmp_path, capsys):
    save_stats(two_shards[0], tmp_path / "a.npz")
    save_stats(two_shards[0], tmp_path / "b.npz")
    code = cli_main(["analyze", "merge", "--stats", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                     "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "shard 0 given 2 times" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "--dataset", "digits", "--out", "o"], "required: --weights"),
        (["analyze", "--weights", "w.pt", "--dataset", "digits", "--shards", "0", "--out", "o"], "--shards"),
        (["analyze", "--weights", "w.pt", "--dataset", "digits", "--stats-out", "s.npz"], "--shard-index"),
        (["analyze", "merge", "--out", "o"], "--stats"),
    ],
)
def test_cli_bad_analyze_arguments_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_merge_names_a_file_that_is_not_stats(tmp_path, capsys):
    (tmp_path / "x.npz").write_text(json.dumps({"no": "stats"}))
    assert cli_main(["analyze", "merge", "--stats", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "x.npz" in capsys.readouterr().err
