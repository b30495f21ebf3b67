"""Bottleneck retraining from cached head activations: the same training as running the frozen
head every step, whether the cache is held in memory or spilled to a memory-mapped file."""

from __future__ import annotations

import os

import pytest
import torch

from isplit.checkpoint import ModelInfo
from isplit.cuts import find_cut_points
from isplit.data import load_dataset
from isplit.messages import BottleneckSpec
from isplit.retrain import Abandoned, ActivationCache, retrain_split
from isplit.zoo import build_model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.25).eval()
    info = ModelInfo(
        arch="vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.25,
        class_names=[str(k) for k in range(10)], mean=[0.3], std=[0.4],
    )  # fmt: skip
    data = load_dataset("digits", "test").subset(None, 96)
    cuts = [p.module for p in find_cut_points(model, (1, 32, 32)) if not p.skipped]
    return model, info, data, cuts[len(cuts) // 2]


def _retrain(setup, **kwargs):
    model, info, data, cut = setup
    spec = BottleneckSpec(compression_ratio=4, epochs=2, batch_size=32, lr=5e-3, seed=3)
    return retrain_split(model, info, cut, data, data, spec, **kwargs)


def test_cached_training_matches_running_the_frozen_head_every_step(setup):
    cached = _retrain(setup)
    uncached = _retrain(setup, cache_activations=False)
    assert len(cached.losses) == len(uncached.losses) == 2 * 3
    # Batch composition changes convolution rounding by an ulp or so; nothing more.
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-4)
    assert cached.accuracy_split == pytest.approx(uncached.accuracy_split, abs=1 / 96)
    for a, b in zip(cached.pair.head.encoder.parameters(), uncached.pair.head.encoder.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_a_cache_over_its_memory_limit_spills_to_disk_with_the_same_result(setup, monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    in_memory = _retrain(setup)
    spilled_dirs: list[str] = []
    real_init = ActivationCache.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.spilled:
            spilled_dirs.append(self._dir.name)

    monkeypatch.setattr(ActivationCache, "__init__", spy)
    spilled = _retrain(setup, cache_memory_bytes=1024)
    assert len(spilled_dirs) == 1 and spilled_dirs[0].startswith(str(tmp_path))
    assert not os.path.exists(spilled_dirs[0]), "the spill directory is removed after training"
    assert spilled.losses == in_memory.losses  # float32 on disk is exactly float32 in memory
    assert spilled.accuracy_split == in_memory.accuracy_split


def test_spill_file_holds_every_row_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    labels = torch.arange(10) % 3
    images = torch.randn(10, 2, 3)
    batches = [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]

    class Data:
        def __len__(self):
            return 10

    Data.labels = labels
    cache = ActivationCache.fill(Data(), batches, lambda x: (x * 2, x.sum((1, 2))[:, None]), memory_bytes=0)
    assert cache.spilled and any(tmp_path.iterdir())
    torch.testing.assert_close(cache.acts, images * 2, rtol=0, atol=0)
    rows = torch.cat([y for _, _, y in cache.batches(4, seed=1)])
    assert sorted(rows.tolist()) == sorted(labels.tolist())
    cache.close()
    assert not any(tmp_path.iterdir())


def test_stop_during_caching_abandons_and_leaves_no_spill_files(setup, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    calls = iter(range(100))
    with pytest.raises(Abandoned, match="caching"):
        _retrain(setup, cache_memory_bytes=0, should_stop=lambda: next(calls) >= 2)
    assert not any(tmp_path.iterdir())
