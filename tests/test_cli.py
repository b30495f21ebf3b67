"""The ``isplit`` CLI end to end, in subprocesses, on the digits dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isplit.analysis import AnalysisResult
from isplit.checkpoint import load_model
from isplit.data import load_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def isplit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isplit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """A VGG11 (width 0.25) trained for 3 epochs on digits, once per session."""
    work = tmp_path_factory.mktemp("cli-train")
    done = isplit(
        "zoo", "train", "--arch", "vgg11", "--width", "0.25", "--dataset", "digits", "--epochs", "3",
        "--out", "m.pt", cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return work / "m.pt"


def _analyze(weights: Path, out: Path, *extra: str) -> AnalysisResult:
    done = isplit(
        "analyze", "--weights", str(weights), "--dataset", "digits", "--max-images", "200",
        "--out", str(out), *extra, cwd=out.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "best cut:" in done.stdout
    return AnalysisResult.model_validate_json((out / "result.json").read_text())


@pytest.fixture(scope="session")
def full_analysis(weights, tmp_path_factory) -> tuple[Path, AnalysisResult]:
    out = tmp_path_factory.mktemp("cli-analyze") / "all"
    return out, _analyze(weights, out)


@pytest.fixture(scope="session")
def subset_analysis(weights, tmp_path_factory) -> tuple[Path, AnalysisResult]:
    out = tmp_path_factory.mktemp("cli-analyze") / "subset"
    return out, _analyze(weights, out, "--classes", "1,7")


# -- success paths --------------------------------------------------------------------------


def test_zoo_train_writes_a_checkpoint_that_learned_digits(weights):
    model, info = load_model(weights)
    assert (info.arch, info.width, info.dataset, info.epochs) == ("vgg11", 0.25, "digits", 3)
    assert info.num_classes == 10 and info.in_channels == 1
    assert info.test_accuracy is not None and info.test_accuracy > 0.3  # chance is 0.1
    assert not model.training


def test_analyze_writes_a_result_json_that_parses(full_analysis):
    _, result = full_analysis
    assert result.model.arch == "vgg11" and result.dataset == "digits" and result.split == "test"
    assert result.classes is None and result.curve.classes is None
    assert result.curve.num_images == 200
    assert result.curve.target == "label"
    assert result.ranking == result.curve.ranking()
    assert result.curve.best in result.ranking
    assert result.images_per_second > 0


def test_analyze_writes_two_png_plots(full_analysis):
    out, _ = full_analysis
    for name in ("curve.png", "classes.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_analyze_with_classes_gives_a_subset_result(subset_analysis):
    _, result = subset_analysis
    test = load_dataset("digits", "test")
    expected_images = int(torch.isin(test.labels, torch.tensor([1, 7])).sum())  # fewer than 200
    assert result.classes == [1, 7]
    assert result.curve.classes == [1, 7]
    assert result.curve.num_images == expected_images
    assert set(result.curve.per_class) == {"1", "7"}


# -- user errors: exit 2, one line on stderr, no traceback ----------------------------------


def _broken_image_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / split / str(digit) / "ok.png")
    (root / "test" / "3" / "broken.png").write_bytes(b"not an image at all")
    return root


ANALYZE = ["analyze", "--weights", "{weights}", "--dataset", "digits", "--out", "out"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["cuts", "--arch", "nope"], "'nope'"),
        (["analyze", "--weights", "missing.pt", "--dataset", "digits", "--out", "out"], "missing.pt"),
        ([*ANALYZE, "--arch", "resnet18"], "'resnet18'"),
        ([*ANALYZE, "--classes", "1,banana"], "'banana'"),
        (["analyze", "--weights", "{weights}", "--dataset", "imagefolder:/no/such/folder", "--out", "out"],
         "/no/such/folder"),
        (["analyze", "--weights", "{weights}", "--dataset", "imagefolder:{broken}", "--out", "out"], "broken.png"),
    ],
    ids=["unknown-arch", "missing-weights", "other-arch", "unknown-class", "missing-folder", "unreadable-image"],
)  # fmt: skip
def test_user_error_exits_2_with_one_line_naming_the_bad_value(args, named, weights, tmp_path):
    broken = _broken_image_folder(tmp_path / "folder")
    argv = [a.format(weights=weights, broken=broken) for a in args]
    done = isplit(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("isplit: error:")
    assert named in lines[0]
    assert "Traceback" not in done.stderr
