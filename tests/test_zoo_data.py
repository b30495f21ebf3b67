"""Model zoo, datasets, preprocessing and checkpoints."""

from __future__ import annotations

import hashlib
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from isplit import IsplitError
from isplit import data as isplit_data
from isplit.checkpoint import ModelInfo, load_model, read_checkpoint, save_checkpoint
from isplit.data import (
    FASHION_MNIST_CLASSES,
    load_dataset,
    pil_to_uint8,
    preprocess_image,
    resolve_classes,
    to_model_input,
)
from isplit.zoo import ARCHS, build_model

# -- zoo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_for_small_grayscale_inputs_and_runs_forward(arch):
    model = build_model(arch, num_classes=10, in_channels=1, input_size=32).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10)


def test_unknown_arch_is_an_error_naming_it_and_the_choices():
    with pytest.raises(IsplitError, match=r"'nope'.*vgg16.*resnet50"):
        build_model("nope", num_classes=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 2}, "in_channels"),
        ({"width": 0.0}, "width"),
        ({"arch": "resnet18", "width": 0.5}, "VGG only"),
    ],
)
def test_bad_build_arguments_are_errors_naming_the_value(kwargs, match):
    args = {"arch": "vgg11", "num_classes": 10, **kwargs}
    with pytest.raises(IsplitError, match=match):
        build_model(args.pop("arch"), **args)


# -- digits ---------------------------------------------------------------------------------


def _fingerprints(images: torch.Tensor, labels: torch.Tensor) -> list[bytes]:
    return [hashlib.sha1(im.numpy().tobytes() + bytes([int(y)])).digest() for im, y in zip(images, labels, strict=True)]


def test_digits_split_sizes_are_80_20_and_deterministic():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_digits_splits_are_disjoint_and_cover_the_dataset():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    train_keys = set(_fingerprints(train.images, train.labels))
    test_keys = set(_fingerprints(test.images, test.labels))
    assert len(train_keys) == len(train) and len(test_keys) == len(test)  # the dataset has no duplicates
    assert train_keys.isdisjoint(test_keys)


def test_unknown_dataset_and_split_are_errors():
    with pytest.raises(IsplitError, match="'mnist'"):
        load_dataset("mnist", "train")
    with pytest.raises(IsplitError, match="'validation'"):
        load_dataset("digits", "validation")


# -- Fashion-MNIST --------------------------------------------------------------------------


def test_fashion_mnist_test_split_loads():
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert test.class_names == list(FASHION_MNIST_CLASSES)
    assert sorted(test.labels.unique().tolist()) == list(range(10))


def test_fashion_mnist_missing_directory_says_where_it_looked_and_how_to_fix_it(monkeypatch, tmp_path):
    missing = tmp_path / "no-fashion-here"
    monkeypatch.setattr(isplit_data, "FASHION_MNIST_DIR", missing)
    with pytest.raises(IsplitError, match="ISPLIT_FASHION_MNIST_DIR") as err:
        load_dataset("fashion-mnist", "train")
    assert str(missing) in str(err.value)


# -- image folders --------------------------------------------------------------------------

CLASSES = ["cat", "dog", "owl"]
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}


def _write_pngs(folder: Path, per_class: int, size: int = 10, start: int = 0) -> None:
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            arr = np.full((size, size, 3), COLOURS[name], dtype=np.uint8)
            arr[0, 0] = (i, i, i)  # images differ from one another
            Image.fromarray(arr).save(folder / name / f"{name}_{i:03d}.png")


def test_imagefolder_without_split_folders_splits_deterministically_and_disjointly(tmp_path):
    _write_pngs(tmp_path, per_class=20)
    spec = f"imagefolder:{tmp_path}"
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    assert train.class_names == CLASSES and test.class_names == CLASSES
    assert len(train) + len(test) == 60 and len(test) > 0
    assert set(_fingerprints(train.images, train.labels)).isdisjoint(_fingerprints(test.images, test.labels))
    assert torch.equal(load_dataset(spec, "test").images, test.images)


def test_imagefolder_images_and_labels_follow_the_folders(tmp_path):
    _write_pngs(tmp_path, per_class=20)
    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    assert train.images.shape[1:] == (3, 10, 10)
    for image, label in zip(train.images, train.labels, strict=True):
        assert tuple(image[:, 5, 5].tolist()) == COLOURS[CLASSES[int(label)]]


def test_imagefolder_with_train_and_test_folders_uses_them(tmp_path):
    _write_pngs(tmp_path / "train", per_class=4)
    _write_pngs(tmp_path / "test", per_class=2, start=50)
    spec = f"imagefolder:{tmp_path}"
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    assert (len(train), len(test)) == (12, 6)
    assert train.class_names == CLASSES and test.class_names == CLASSES
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_val_folder_serves_as_test_split(tmp_path):
    _write_pngs(tmp_path / "train", per_class=4)
    _write_pngs(tmp_path / "val", per_class=3, start=50)
    assert len(load_dataset(f"imagefolder:{tmp_path}", "test")) == 9


def test_imagefolder_in_one_channel_is_grayscale(tmp_path):
    _write_pngs(tmp_path / "train", per_class=2)
    _write_pngs(tmp_path / "test", per_class=1, start=50)
    test = load_dataset(f"imagefolder:{tmp_path}", "test", in_channels=1)
    assert test.images.shape == (3, 1, 10, 10)


def test_imagefolder_unreadable_image_is_an_error_naming_the_file(tmp_path):
    _write_pngs(tmp_path / "train", per_class=2)
    _write_pngs(tmp_path / "test", per_class=1, start=50)
    (tmp_path / "test" / "dog" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(IsplitError, match="broken.png"):
        load_dataset(f"imagefolder:{tmp_path}", "test")


def test_imagefolder_missing_folder_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(IsplitError, match="nowhere"):
        load_dataset(f"imagefolder:{missing}", "train")


def test_imagefolder_without_class_folders_is_an_error(tmp_path):
    with pytest.raises(IsplitError, match="class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path}", "train")


# -- class names ----------------------------------------------------------------------------


def test_resolve_classes_by_index_and_name_sorted_and_unique():
    names = list(FASHION_MNIST_CLASSES)
    assert resolve_classes(["7", "1"], names) == [1, 7]
    assert resolve_classes([8, "sneaker", " bag "], names) == [7, 8]
    assert resolve_classes(None, names) is None


@pytest.mark.parametrize(("requested", "match"), [(["10"], "10"), (["-1"], "-1"), (["banana"], "'banana'")])
def test_resolve_classes_rejects_bad_ones_naming_them(requested, match):
    with pytest.raises(IsplitError, match=match):
        resolve_classes(requested, list(FASHION_MNIST_CLASSES))


def test_resolve_classes_rejects_an_empty_subset():
    with pytest.raises(IsplitError, match="empty"):
        resolve_classes([], list(FASHION_MNIST_CLASSES))


def test_resolve_classes_prefers_an_exact_class_name_over_an_index():
    assert resolve_classes(["20"], ["10", "20", "30"]) == [1]


# -- preprocessing --------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "in_channels"), [("RGB", 3), ("L", 1), ("RGB", 1)])
def test_preprocess_image_equals_the_batch_path_for_the_same_pixels(mode, in_channels):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 27, 3), dtype=np.uint8)).convert(mode)
    mean, std = [0.5] * in_channels, [0.25] * in_channels
    single = preprocess_image(image, in_channels=in_channels, input_size=32, mean=mean, std=std)
    batch = to_model_input(pil_to_uint8(image, in_channels)[None], 32, mean, std)
    assert single.shape == (in_channels, 32, 32) and single.dtype == torch.float32
    assert torch.equal(single, batch[0])


def test_to_model_input_scales_to_unit_range_then_normalises():
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    out = to_model_input(images, 2, [0.2], [0.5])
    torch.testing.assert_close(out, (torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]]) - 0.2) / 0.5)


# -- checkpoints ----------------------------------------------------------------------------


def _info(arch: str = "vgg11", width: float = 0.125) -> ModelInfo:
    return ModelInfo(arch=arch, num_classes=10, in_channels=1, input_size=32, width=width,
                     class_names=[str(i) for i in range(10)], mean=[0.3], std=[0.4], dataset="digits")  # fmt: skip


@pytest.fixture(scope="module")
def small_vgg() -> nn.Module:
    return build_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=0.125)


def test_checkpoint_round_trip_restores_weights_and_info(tmp_path, small_vgg):
    path = tmp_path / "sub" / "m.pt"
    save_checkpoint(path, small_vgg, _info())
    model, info = load_model(path)
    assert info == _info()
    assert not model.training
    saved, loaded = small_vgg.state_dict(), model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_checkpoint_of_another_arch_is_refused_naming_both(tmp_path, small_vgg):
    path = tmp_path / "m.pt"
    save_checkpoint(path, small_vgg, _info())
    with pytest.raises(IsplitError, match=r"'vgg11'.*'resnet18'"):
        load_model(path, arch="resnet18")


def test_checkpoint_whose_weights_do_not_fit_its_recorded_shape_is_refused(tmp_path, small_vgg):
    path = tmp_path / "m.pt"
    save_checkpoint(path, small_vgg, _info(width=0.25))  # recorded width disagrees with the weights
    with pytest.raises(IsplitError, match="do not match") as err:
        load_model(path)
    assert "\n" not in str(err.value) and "size mismatch" in str(err.value)


def test_missing_weights_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(IsplitError, match="absent.pt"):
        load_model(tmp_path / "absent.pt")


def test_bare_state_dict_is_readable_but_not_loadable_as_a_model(tmp_path, small_vgg):
    path = tmp_path / "bare.pt"
    torch.save(small_vgg.state_dict(), path)
    info, state = read_checkpoint(path)
    assert info is None and state.keys() == small_vgg.state_dict().keys()
    with pytest.raises(IsplitError, match="bare state_dict"):
        load_model(path)


class Payload:
    """Unpickling this would create the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "isplit-checkpoint/1", "info": {}, "state_dict": {}, "x": Payload(marker)}, path)
    with pytest.raises(IsplitError, match="cannot be loaded safely"):
        read_checkpoint(path)
    assert not marker.exists()
