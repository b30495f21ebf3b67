"""The benchmark's models: the reference VGG11 (cached), the full-image "tail" (the whole
model, preprocessing included, served like a tail), and a ResNet-18 at 64 px (cached) cut
without a bottleneck, whose tail costs milliseconds per image."""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from isplit.checkpoint import ModelInfo, load_model
from isplit.cuts import split_at
from isplit.data import ImageSet
from isplit.dev.reference import cached_reference_model
from isplit.retrain import EdgeHead, HeadTailPair, ServerTail

from .results import log


def reference_model(args: argparse.Namespace, train: ImageSet, test: ImageSet) -> tuple[nn.Module, ModelInfo, Path]:
    """The checkpoint given, else a cached or freshly trained VGG11 (``--width``) at 32 px."""
    path = args.checkpoint
    if path is None:
        path = args.work_dir / f"vgg11-w{args.width}-fmnist-e{args.epochs}-n{args.train_images}.pt"
        if not path.is_file():
            log(f"training the reference model ({args.epochs} epochs on {args.train_images} images) ...")
        cached_reference_model(path, arch="vgg11", dataset="fashion-mnist", input_size=32, width=args.width,
                               epochs=args.epochs, lr=2e-3, max_train_images=args.train_images, device="cpu",
                               progress=False)  # fmt: skip
    model, info = load_model(path)
    return model, info, path


def resnet_reference(args: argparse.Namespace) -> tuple[nn.Module, ModelInfo, Path]:
    """A cached or freshly trained ResNet-18 at 64 px (CIFAR-style stem: full resolution to
    ``layer1``), 1 epoch on ``--resnet-train-images`` images: for serving figures, not accuracy
    (its test accuracy, on the first 2,000 test images, is reported)."""
    path = args.work_dir / f"resnet18-64px-fmnist-e1-n{args.resnet_train_images}.pt"
    if not path.is_file():
        log(f"training the ResNet-18 reference model (1 epoch on {args.resnet_train_images} images, 64 px) ...")
    cached_reference_model(path, arch="resnet18", dataset="fashion-mnist", input_size=64, epochs=1, lr=2e-3,
                           max_train_images=args.resnet_train_images, max_test_images=2000, device="cpu",
                           progress=False)  # fmt: skip
    model, info = load_model(path)
    return model, info, path


def plain_split(model: nn.Module, info: ModelInfo, cut: str) -> HeadTailPair:
    """``model`` cut at ``cut`` without a bottleneck: the head sends the cut's activation as is."""
    head, tail = split_at(model.eval(), cut)
    with torch.no_grad():
        code = head(torch.zeros(1, info.in_channels, info.input_size, info.input_size))
    return HeadTailPair(EdgeHead(head, nn.Identity()), ServerTail(nn.Identity(), tail), cut, list(code.shape[1:]))


class FullImageModel(nn.Module):
    """The whole model behind a "tail" interface: raw pixels ``(N, C, H, W)`` float32 in [0, 255]
    (native size) -> logits. Preprocessing is :func:`isplit.data.to_model_input`'s, in the graph."""

    def __init__(self, model: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.model, self.size = model, info.input_size
        self.register_buffer("mean", torch.tensor(info.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels / 255.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.model((x - self.mean) / self.std)


def export_full_image(model: nn.Module, info: ModelInfo, image_shape: Sequence[int], out: Path, name: str) -> Path:
    """``tail.pt`` + ``tail.json`` of :class:`FullImageModel`; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    full = FullImageModel(model, info).eval()
    example = torch.zeros(1, *image_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(full, example, check_trace=False)
        torch.jit.save(traced, str(out / "tail.pt"))
    meta = {"schema_version": 1, "model_name": name, "analysis_id": "bench", "candidate_id": "full-image",
            "cut": "input", "code_shape": list(image_shape), "class_names": info.class_names}  # fmt: skip
    (out / "tail.json").write_text(json.dumps(meta))
    return out
