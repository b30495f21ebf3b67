"""Kafka message schemas: one pydantic model per topic, JSON on the wire.

Every message carries ``schema_version`` (currently 1). Keys are the analysis id (UTF-8).
Readers tolerate unknown fields (an additive change keeps version 1); an incompatible change
bumps the version and the topic name suffix together.

    data = encode(candidate)                      # bytes, UTF-8 JSON
    candidate = decode(SplitCandidate, data)      # raises MessageError with a readable reason
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

TOPIC_CANDIDATES = "isplit.split-candidates.v1"
TOPIC_RESULTS = "isplit.training-results.v1"
TOPIC_DEAD_LETTER = "isplit.dead-letter.v1"

#: Partition count each topic is created with (see ``isplit.bus.ensure_topics``).
TOPIC_PARTITIONS: dict[str, int] = {
    TOPIC_CANDIDATES: 6,
    TOPIC_RESULTS: 3,
    TOPIC_DEAD_LETTER: 1,
}

#: An id safe as a Kafka key, a file or directory name, a URL path segment and a TorchServe
#: model name: ASCII letters, digits, '_' and '-', starting with a letter or digit.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"

Id = Annotated[str, Field(pattern=ID_PATTERN)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Field(ge=0)]

M = TypeVar("M", bound=BaseModel)

#: The largest message value ``decode`` reads, bytes: a candidate or result is a few KiB.
MAX_MESSAGE_BYTES = 1024 * 1024
#: The deepest JSON nesting ``decode`` reads (objects and arrays); the contract needs 4.
MAX_MESSAGE_DEPTH = 32


class MessageError(ValueError):
    """A message that cannot be read: bad JSON, unsupported schema version or invalid fields."""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class WireMessage(BaseModel):
    """Base of every wire model: versioned, timestamped, tolerant of unknown fields."""

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal[1] = SCHEMA_VERSION
    created_at: datetime = Field(default_factory=_utc_now)

    @field_validator("created_at")
    @classmethod
    def _as_utc(cls, value: datetime) -> datetime:
        # Naive timestamps are taken as UTC so that every message compares and sorts alike.
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class ModelSpec(BaseModel):
    """The trained model a split is computed for."""

    model_config = ConfigDict(extra="ignore")

    arch: str = Field(min_length=1, description="model zoo builder name, e.g. 'resnet18'")
    num_classes: PositiveInt
    in_channels: PositiveInt
    input_size: PositiveInt = Field(description="side S of the square (S, S) input, pixels")
    weights_uri: str = Field(min_length=1, description="weights file, a path under the artifact root")
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("weights_uri")
    @classmethod
    def _no_parent_components(cls, value: str) -> str:
        if ".." in re.split(r"[\\/]", value):
            raise ValueError(f"must stay under the artifact root, got {value!r} (contains '..')")
        return value


class DatasetSpec(BaseModel):
    """The data the head/tail pair is trained and tested on."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, description="'digits', 'fashion-mnist' or 'imagefolder:<dir>'")
    classes: list[NonNegativeInt] | None = Field(
        default=None, description="class subset as label indices; None = all classes"
    )
    max_train_images: PositiveInt | None = None
    max_test_images: PositiveInt | None = None

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("must name at least one class, or be null for all classes")
            if len(set(value)) != len(value):
                raise ValueError(f"must be distinct label indices, got {value}")
        return value


class BottleneckSpec(BaseModel):
    """The bottleneck budget: how the bottleneck inserted at a cut is built and trained.

    One type for the API (``AnalysisOptions.bottleneck()``), the candidate message, the
    retrainer (``isplit.retrain.retrain_split``) and the sweep (``SweepConfig.bottleneck()``).
    """

    model_config = ConfigDict(extra="ignore")

    compression_ratio: PositiveInt = Field(default=4, description="channels at the cut / code channels")
    epochs: PositiveInt = 2
    lr: float = Field(default=5e-3, gt=0.0, allow_inf_nan=False)
    batch_size: PositiveInt = 64
    finetune_tail: bool = False
    seed: int = 0


class SplitCandidate(WireMessage):
    """One candidate cut of one analysis; topic ``isplit.split-candidates.v1``, key analysis_id."""

    analysis_id: Id
    candidate_id: Id
    model: ModelSpec
    dataset: DatasetSpec
    cut: str = Field(min_length=1, description="qualified module name, e.g. 'layer3.1'")
    predicted_rank: PositiveInt = Field(description="1 = best by CUI")
    cui: FiniteFloat
    log10_cui: FiniteFloat
    size_rank: PositiveInt = Field(description="1 = smallest output at the cut")
    output_shape: list[PositiveInt] = Field(min_length=1, description="(C, H, W) or (F,) at the cut")
    output_bytes: PositiveInt = Field(description="bytes per image at the cut, float32")
    target: Literal["label", "predicted"]
    bottleneck: BottleneckSpec = Field(default_factory=BottleneckSpec)


class TrainingResult(WireMessage):
    """The trainer's outcome for one candidate; topic ``isplit.training-results.v1``, key analysis_id."""

    analysis_id: Id
    candidate_id: Id
    cut: str = Field(min_length=1)
    status: Literal["succeeded", "failed"]
    error: str | None = None
    accuracy_original: Fraction | None = None
    accuracy_split: Fraction | None = None
    accuracy_original_subset: Fraction | None = None
    accuracy_split_subset: Fraction | None = None
    bytes_per_image: dict[Literal["fp32", "fp16", "int8"], NonNegativeInt] = Field(
        default_factory=dict, description="bottleneck code size per image on the wire, bytes"
    )
    head_params: NonNegativeInt | None = None
    tail_params: NonNegativeInt | None = None
    head_flops: NonNegativeInt | None = None
    tail_flops: NonNegativeInt | None = None
    training_seconds: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    latency_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    head_uri: str | None = None
    tail_mar_uri: str | None = None
    model_name: str | None = None
    inference_url: str | None = None
    trainer_id: str | None = None

    @classmethod
    def failure(cls, candidate: SplitCandidate, error: str, trainer_id: str | None = None) -> TrainingResult:
        """The failed result of ``candidate``, with the reason."""
        return cls(
            analysis_id=candidate.analysis_id,
            candidate_id=candidate.candidate_id,
            cut=candidate.cut,
            status="failed",
            error=error,
            trainer_id=trainer_id,
        )

    @model_validator(mode="after")
    def _failure_has_reason(self) -> TrainingResult:
        if self.status == "failed" and not self.error:
            raise ValueError("status 'failed' needs an error message")
        return self


class DeadLetter(WireMessage):
    """A message a service could not process; topic ``isplit.dead-letter.v1``.

    ``original_b64`` holds the original value bytes exactly (base64), whatever they were.
    """

    source_topic: str = Field(min_length=1)
    partition: NonNegativeInt | None = None
    offset: NonNegativeInt | None = None
    key: str | None = None
    original_b64: str
    reason: str = Field(min_length=1)
    service: str = Field(min_length=1)

    @field_validator("original_b64")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"is not valid base64: {exc}") from None
        return value

    @classmethod
    def from_bytes(
        cls,
        original: bytes | None,
        *,
        source_topic: str,
        reason: str,
        service: str,
        partition: int | None = None,
        offset: int | None = None,
        key: bytes | str | None = None,
    ) -> DeadLetter:
        """Wrap the original value bytes (None for a tombstone is stored as empty)."""
        if isinstance(key, bytes):
            key = key.decode("utf-8", errors="replace")
        return cls(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            key=key,
            original_b64=base64.b64encode(original or b"").decode("ascii"),
            reason=reason,
            service=service,
        )

    def original(self) -> bytes:
        """The original value bytes."""
        return base64.b64decode(self.original_b64)


#: The model carried by each topic.
TOPIC_MODELS: dict[str, type[WireMessage]] = {
    TOPIC_CANDIDATES: SplitCandidate,
    TOPIC_RESULTS: TrainingResult,
    TOPIC_DEAD_LETTER: DeadLetter,
}


def candidate_id_for(analysis_id: str, cut: str) -> str:
    """The candidate id of ``cut`` in ``analysis_id``: deterministic and safe as a file name,
    URL path segment and TorchServe model name, e.g. ``("a1b2", "layer3.1") -> "a1b2-layer3_1"``.

    The analysis id must already be an id (``ID_PATTERN``); every character of the cut outside
    ``[A-Za-z0-9]`` becomes ``_``. A result longer than 128 characters is shortened and ends in a
    hash of the full form, so it stays unique.
    """
    if not re.match(ID_PATTERN, analysis_id):
        raise ValueError(f"analysis id {analysis_id!r} must match {ID_PATTERN}")
    if not cut:
        raise ValueError("cut must be a non-empty module name")
    candidate = f"{analysis_id}-{re.sub(r'[^A-Za-z0-9]', '_', cut)}"
    if len(candidate) > 128:
        digest = hashlib.sha256(candidate.encode()).hexdigest()[:12]
        candidate = f"{candidate[:115]}-{digest}"
    return candidate


def resolve_under(root: Path, uri: str, what: str) -> Path:
    """The path ``uri`` (as a message carries it: relative to ``root``) resolved under ``root``,
    symlinks followed. Messages are untrusted: an absolute path or one that leads out of
    ``root`` raises :class:`MessageError` naming ``what`` and the value."""
    base = root.resolve()
    path = (base / uri).resolve()
    if Path(uri).is_absolute() or not path.is_relative_to(base):
        raise MessageError(f"{what} {uri!r} is outside the artifact root")
    return path


def encode(msg: BaseModel) -> bytes:
    """The wire form of a message: UTF-8 JSON."""
    return msg.model_dump_json().encode("utf-8")


def decode(model_cls: type[M], data: bytes | str | None) -> M:
    """Parse and validate one message of type ``model_cls``; messages are untrusted input.

    Raises:
        MessageError: on empty input, a value over ``MAX_MESSAGE_BYTES``, bad JSON, nesting
            deeper than ``MAX_MESSAGE_DEPTH``, a missing or unsupported ``schema_version`` or
            invalid fields, with the reason on one line. Nothing else escapes.
    """
    name = model_cls.__name__
    if data is None or len(data) == 0:
        raise MessageError(f"{name}: empty message")
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    if size > MAX_MESSAGE_BYTES:
        raise MessageError(f"{name}: message of {size} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes")
    try:
        payload = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except UnicodeDecodeError as exc:
        raise MessageError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise MessageError(f"{name}: not valid JSON ({exc.msg} at {where})") from None
    except RecursionError:
        raise MessageError(f"{name}: JSON nested deeper than {MAX_MESSAGE_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer literal with too many digits
        raise MessageError(f"{name}: not valid JSON ({exc})") from None
    if _depth(payload) > MAX_MESSAGE_DEPTH:
        raise MessageError(f"{name}: JSON nested deeper than {MAX_MESSAGE_DEPTH} levels")
    if not isinstance(payload, dict):
        raise MessageError(f"{name}: expected a JSON object, got {type(payload).__name__}")
    if "schema_version" not in payload:
        raise MessageError(f"{name}: missing schema_version (supported: {SCHEMA_VERSION})")
    version = payload["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MessageError(f"{name}: unsupported schema_version {_short_repr(version)} (supported: {SCHEMA_VERSION})")
    try:
        return model_cls.model_validate(payload)
    except ValidationError as exc:
        raise MessageError(f"{name}: invalid message: {summarize_validation_error(exc)}") from None


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_MESSAGE_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def summarize_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """One line naming each bad field, what is wrong and the value given (shortened)."""
    return summarize_errors(exc.errors(), limit=limit)


def summarize_errors(errors: Sequence[Mapping[str, Any]], *, limit: int = 5, skip_loc: Sequence[str] = ()) -> str:
    """One line for pydantic-style ``errors`` (``loc``, ``msg``, ``type``, ``input``): each bad
    field, what is wrong and the value given (shortened; not for a missing field or an object).
    Location parts in ``skip_loc`` (FastAPI's ``"body"``) are left out."""
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in skip_loc) or "message"
        part = f"{where}: {error.get('msg')}"
        if error.get("type") != "missing" and "input" in error and not isinstance(error["input"], dict):
            part += f" (got {_short_repr(error['input'])})"
        parts.append(part)
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
