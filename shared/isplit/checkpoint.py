"""Reference-model checkpoints: weights plus everything needed to rebuild and feed the model.

Saved with ``torch.save`` as a dict of plain values and tensors, loaded with
``torch.load(weights_only=True)`` so a checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from isplit import IsplitError
from isplit.zoo import build_model

FORMAT = "isplit-checkpoint/1"


class ModelInfo(BaseModel):
    """What a checkpoint records besides the weights."""

    arch: str
    num_classes: int
    in_channels: int
    input_size: int
    width: float = 1.0
    class_names: list[str]
    mean: list[float]
    std: list[float]
    dataset: str = ""
    test_accuracy: float | None = None
    epochs: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


def save_checkpoint(path: Path, model: nn.Module, info: ModelInfo) -> None:
    """Write ``{format, info, state_dict}`` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "info": info.model_dump(), "state_dict": state}, path)


def read_checkpoint(path: Path) -> tuple[ModelInfo | None, dict[str, torch.Tensor]]:
    """Read a checkpoint safely: ``(info or None for a bare state_dict, state_dict)``."""
    if not Path(path).is_file():
        raise IsplitError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals and corrupt files raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IsplitError(f"weights file {path} cannot be loaded safely: {first[:200]}") from exc
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return ModelInfo.model_validate(obj["info"]), obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None, obj
    raise IsplitError(f"weights file {path} is neither an isplit checkpoint nor a state_dict")


def load_model(path: Path, *, arch: str | None = None, meta: Any = None) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model recorded in a checkpoint and load its weights (eval mode).

    ``arch``, when given, must match the checkpoint's (a clear error otherwise). A
    ``torch.export`` program (``.pt2``) is loaded by :mod:`isplit.exported` (arch
    ``"exported"``), with ``meta`` (an ``isplit.exported.ProgramMeta``) as its optional class
    names and normalisation.
    """
    from isplit import exported

    if Path(path).is_file() and exported.is_exported_program(Path(path)):
        model, info = exported.load_exported(Path(path), meta)
        if arch is not None and arch != info.arch:
            raise IsplitError(f"weights file {path} holds a torch.export program (arch {info.arch!r}), not {arch!r}")
        return model, info
    info, state = read_checkpoint(path)
    if info is None:
        raise IsplitError(
            f"weights file {path} is a bare state_dict; isplit needs a checkpoint from `isplit zoo train`"
        )
    if arch is not None and arch != info.arch:
        raise IsplitError(f"weights file {path} holds a {info.arch!r} model, not {arch!r}")
    model = build_model(
        info.arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_size=info.input_size,
        width=info.width,
    )
    load_state(model, state, str(path))
    return model.eval(), info


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what does not match."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise IsplitError(f"weights in {source} do not match the model: {detail[:300]}") from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
