"""Training and evaluation loops shared by `isplit zoo train` and the trainer service."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from isplit.checkpoint import ModelInfo
from isplit.data import ImageSet
from isplit.zoo import build_model


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs are reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    """``"auto"``/None -> CUDA when present, else CPU; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over ``(images, labels)`` batches (eval mode)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in batches:
        logits = model(images.to(device))
        correct += int((logits.argmax(1).cpu() == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    return correct / max(total, 1)


def train_classifier(
    model: nn.Module,
    train: ImageSet,
    *,
    input_size: int,
    mean: list[float],
    std: list[float],
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train with Adam and cross-entropy (cosine LR); returns ``{"seconds", "samples_per_second"}``."""
    seed_everything(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(total=steps, unit="batch", desc="train", disable=not progress)
    start = time.perf_counter()
    for epoch in range(epochs):
        running = 0.0
        n = 0
        for images, labels in train.batches(
            batch_size, input_size=input_size, mean=mean, std=std, shuffle=True, seed=seed + epoch
        ):
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * labels.numel()
            n += labels.numel()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / n:.3f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, running / max(n, 1))
    bar.close()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples_per_second": epochs * len(train) / max(seconds, 1e-9)}


def train_reference_model(
    arch: str,
    dataset: str,
    train: ImageSet,
    test: ImageSet,
    *,
    input_size: int,
    width: float = 1.0,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    extra: dict | None = None,
) -> tuple[nn.Module, ModelInfo, dict[str, float]]:
    """Build ``arch`` for ``train``'s classes and channels, train it, measure test accuracy.

    Returns ``(model in eval mode, its ModelInfo (normalisation from the training images),
    train_classifier's stats)``, ready for ``save_checkpoint``.
    """
    mean, std = train.channel_stats()
    model = build_model(
        arch, num_classes=len(train.class_names), in_channels=train.in_channels, input_size=input_size, width=width
    )
    stats = train_classifier(
        model, train, input_size=input_size, mean=mean, std=std, epochs=epochs, batch_size=batch_size, lr=lr,
        device=device, seed=seed, progress=progress,
    )  # fmt: skip
    model.eval()
    acc = evaluate(model, test.batches(256, input_size=input_size, mean=mean, std=std), device)
    info = ModelInfo(
        arch=arch,
        num_classes=len(train.class_names),
        in_channels=train.in_channels,
        input_size=input_size,
        width=width,
        class_names=train.class_names,
        mean=mean,
        std=std,
        dataset=dataset,
        test_accuracy=acc,
        epochs=epochs,
        extra={"train_seconds": round(stats["seconds"], 2), "train_images": len(train), **(extra or {})},
    )
    return model, info, stats
