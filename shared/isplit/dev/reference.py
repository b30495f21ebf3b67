"""Reference models for the demo and the benchmarks: trained once with
:func:`isplit.training.train_reference_model` (what ``isplit zoo train`` runs), then reused."""

from __future__ import annotations

from pathlib import Path

from isplit.checkpoint import save_checkpoint
from isplit.data import load_dataset
from isplit.training import pick_device, train_reference_model


def cached_reference_model(
    path: Path,
    *,
    arch: str,
    dataset: str,
    input_size: int,
    width: float = 1.0,
    epochs: int = 3,
    lr: float = 2e-3,
    batch_size: int = 128,
    max_train_images: int | None = None,
    max_test_images: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """The checkpoint at ``path``; trained and saved there first if it does not exist (its test
    accuracy measured on the first ``max_test_images`` test images, default all)."""
    if path.is_file():
        return path
    train = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test")
    if max_train_images:
        train = train.subset(None, max_train_images)
    if max_test_images:
        test = test.subset(None, max_test_images)
    model, info, _stats = train_reference_model(
        arch, dataset, train, test, input_size=input_size, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
        device=pick_device(device), progress=progress,
    )  # fmt: skip
    save_checkpoint(path, model.cpu(), info)
    return path
