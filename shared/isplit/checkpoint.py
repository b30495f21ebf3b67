"""Reference-model checkpoints: weights plus everything needed to rebuild and feed the model.

Saved with ``torch.save`` as a dict of plain values and tensors, loaded with
``torch.load(weights_only=True)`` so a checkpoint cannot execute code. A checkpoint is
untrusted input: its metadata is capped and checked (:class:`ModelInfo`), the tensor shapes it
holds are compared with the model its metadata declares on the meta device (no memory) before
the model is built, and its weights must be finite.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator
from torch import nn

from isplit import IsplitError
from isplit.messages import summarize_errors
from isplit.zoo import build_model

FORMAT = "isplit-checkpoint/1"
MAX_CLASSES = 10_000
MAX_INPUT_SIZE = 512  # pixels per side
MAX_WIDTH = 4.0  # the zoo's largest VGG width multiplier

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ModelInfo(BaseModel):
    """What a checkpoint records besides the weights, within the caps a service accepts:
    one class name per class, one finite mean and one positive std per input channel."""

    arch: str = Field(max_length=64)
    num_classes: int = Field(ge=1, le=MAX_CLASSES)
    in_channels: int = Field(ge=1, le=3)
    input_size: int = Field(ge=8, le=MAX_INPUT_SIZE)
    width: float = Field(default=1.0, gt=0, le=MAX_WIDTH)
    class_names: list[Annotated[str, Field(max_length=256)]] = Field(max_length=MAX_CLASSES)
    mean: list[FiniteFloat] = Field(max_length=3)
    std: list[PositiveFloat] = Field(max_length=3)
    dataset: str = ""
    test_accuracy: float | None = None
    epochs: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelInfo:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for in_channels={self.in_channels}")
        return self


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
        try:
            info = ModelInfo.model_validate(obj.get("info"))
        except ValidationError as exc:
            raise IsplitError(f"weights file {path} has bad metadata: {summarize_errors(exc.errors())}") from None
        state = obj.get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise IsplitError(f"weights file {path} has no state_dict of tensors")
        return info, state
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
    check_weights(info, state, str(path))
    model = build_declared(info)
    load_state(model, state, str(path))
    return model.eval(), info


def build_declared(info: ModelInfo) -> nn.Module:
    """The (untrained) zoo model ``info`` declares: architecture, classes, channels, size, width."""
    return build_model(
        info.arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_size=info.input_size,
        width=info.width,
    )


def declared_shapes(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of the model ``info`` declares, built on the meta device (no
    memory is allocated, whatever width the metadata claims)."""
    with torch.device("meta"):
        skeleton = build_declared(info)
    return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}


def check_weights(info: ModelInfo, state: dict[str, torch.Tensor], source: str) -> None:
    """Before the model is built: the tensors must have the shapes the metadata declares
    (names and shapes, compared without allocating the model) and hold finite values."""
    declared = declared_shapes(info)
    held = {name: tuple(t.shape) for name, t in state.items()}
    if declared != held:
        missing = sorted(set(declared) - set(held))
        unexpected = sorted(set(held) - set(declared))
        changed = [f"{k} {held[k]} vs {declared[k]}" for k in declared if k in held and held[k] != declared[k]]
        detail = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("size mismatch (held vs declared)", changed),
            )
            if items
        )
        raise IsplitError(
            f"weights in {source} do not match the {info.arch} (width {info.width}, input {info.input_size}, "
            f"{info.num_classes} classes) their metadata declares: {detail}"
        )
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise IsplitError(f"weights in {source}: tensor {name!r} holds NaN or infinite values")


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
