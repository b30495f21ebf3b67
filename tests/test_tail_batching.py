"""How a tail is registered with TorchServe: batch settings chosen from the tail's measured cost
(the figures of benchmarks/results/serving-cpu.json), explicit trainer settings winning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from isplit import torchserve as ts
from isplit.torchserve import TailBatching, tail_batching
from isplit_trainer.config import Settings

# Per-image tail costs the serving benchmark measured on the 2-core VM (1 thread, batch 1).
VGG11_FEATURES20_MS = 0.35  # the tiny tail: a bottleneck decoder and a linear classifier
RESNET18_LAYER3_MS = 16.92  # ResNet-18 at 64 px after layer3: layer4 and the classifier


def test_a_cheap_tail_batches_only_what_is_queued() -> None:
    assert tail_batching(VGG11_FEATURES20_MS) == TailBatching(batch_size=16, max_batch_delay_ms=0, workers=2)


def test_a_millisecond_tail_waits_a_fraction_of_its_cost_for_a_batch() -> None:
    batching = tail_batching(RESNET18_LAYER3_MS)
    assert batching.max_batch_delay_ms == 2
    assert 0 < batching.max_batch_delay_ms < RESNET18_LAYER3_MS
    assert (batching.batch_size, batching.workers) == (16, 2)


@pytest.mark.parametrize(
    ("tail_ms", "delay_ms"), [(0.99, 0), (1.0, 1), (4.0, 1), (12.0, 2), (20.0, 3), (31.0, 4), (500.0, 5)]
)
def test_the_delay_grows_with_the_tail_cost_up_to_a_cap(tail_ms: float, delay_ms: int) -> None:
    assert tail_batching(tail_ms).max_batch_delay_ms == delay_ms


def test_unset_trainer_settings_take_the_rule() -> None:
    assert Settings().tail_batching(RESNET18_LAYER3_MS) == tail_batching(RESNET18_LAYER3_MS)


def test_explicit_trainer_settings_win_even_when_zero() -> None:
    settings = Settings(tail_batch_size=4, tail_max_batch_delay_ms=0, tail_workers=1)
    assert settings.tail_batching(RESNET18_LAYER3_MS) == TailBatching(batch_size=4, max_batch_delay_ms=0, workers=1)
    only_delay = Settings(tail_max_batch_delay_ms=7).tail_batching(VGG11_FEATURES20_MS)
    assert only_delay == TailBatching(batch_size=16, max_batch_delay_ms=7, workers=2)


def test_tail_cost_is_per_image_on_one_thread_and_restores_the_thread_count() -> None:
    torch.manual_seed(0)
    cheap = nn.Linear(128, 10).eval()
    costly = nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)], nn.Flatten(), nn.LazyLinear(10))
    costly(torch.zeros(1, 64, 32, 32))  # materialise the lazy layer
    threads = torch.get_num_threads()
    cheap_ms = ts.tail_cost_ms(cheap, torch.zeros(1, 128))
    costly_ms = ts.tail_cost_ms(costly.eval(), torch.zeros(1, 64, 32, 32))
    assert torch.get_num_threads() == threads
    assert 0 < cheap_ms < ts.CHEAP_TAIL_MS < costly_ms
    assert tail_batching(cheap_ms).max_batch_delay_ms == 0
    assert tail_batching(costly_ms).max_batch_delay_ms >= 1
    # Per image: a batch of 8 reports about one image's cost, not eight.
    per_image_at_8 = ts.tail_cost_ms(costly, torch.zeros(8, 64, 32, 32))
    assert per_image_at_8 < 2 * costly_ms
