"""The isplit wire format: bottleneck tensors on the network, version 1.

An edge device sends the head's output (a bottleneck code, or a batch of them with a leading
``N`` dim) to the tail server as one self-describing binary message. Decoding reads a fixed
header with :mod:`struct` and the elements with :func:`numpy.frombuffer`; it never unpickles,
so a message cannot execute code. This docstring is the specification.

Byte layout (every multi-byte field little-endian; offsets in bytes)::

    offset        size     type       field
    0             4        bytes      magic, b"ISPW"
    4             1        uint8      format version, 1
    5             1        uint8      dtype code: the sender's tensor dtype before encoding
                                      (1 float32, 2 float16, 3 bfloat16, 4 float64); informational
    6             1        uint8      encoding code (see below)
    7             1        uint8      flags: bit 0 set = payload is zlib-compressed (RFC 1950);
                                      bits 1-7 reserved, must be 0
    8             1        uint8      ndim, 0..8
    9             3        -          reserved, must be 0
    12            4*ndim   uint32[]   shape, outermost dim first
    12+4*ndim     Q        -          quantisation parameters (see below)
    12+4*ndim+Q   4        uint32     L, payload length in bytes as stored (after compression)
    16+4*ndim+Q   L        -          payload: the elements in row-major (C) order

    encoding      code  element  Q (quantisation parameters, after the shape)
    fp32          1     float32  0
    fp16          2     float16  0
    int8          3     int8     8: float32 scale, int32 zero_point (one pair for the tensor)
    int8-channel  4     int8     8*C: float32 scale[C], then int32 zero_point[C], C = shape[1]
                                 (one pair per index of dim 1; needs ndim >= 2)

The message is exactly ``16 + 4*ndim + Q + L`` bytes; trailing bytes are an error.
Uncompressed, ``L = prod(shape) * element size``; compressed, the payload inflates to exactly
that many bytes. Quantised elements decode (in float32) as ``x = (q - zero_point) * scale``;
``scale`` must be finite and > 0, ``zero_point`` in [-128, 127]. This encoder quantises each
range (the tensor, or one channel) as: ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``,
``scale = (hi - lo) / 254`` rounded up to float32 (1.0 when ``hi == lo``),
``zero_point = round(-127 - lo / scale)``, ``q = clamp(round(x / scale) + zero_point, -128, 127)``;
0 is then exact and every element within ``scale / 2`` of its value.

A decoder refuses, with :class:`WireError`: a wrong magic, another version, unknown codes or
flags, non-zero reserved bytes, invalid quantisation parameters, a message shorter or longer
than its header says, a corrupt or over-long zlib stream, a shape other than the expected
one, and a message or decoded float32 tensor larger than ``max_bytes`` (checked from the
header, before inflating: a zip bomb costs nothing). A batch is a tensor with a leading N dim.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from isplit import IsplitError

MAGIC = b"ISPW"
VERSION = 1
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: The HTTP request header carrying how many classes the tail answers per image.
#: TorchServe 0.12 drops query parameters on /predictions/<model>, so k travels in a header.
TOP_K_HEADER = "X-Isplit-Top-K"
FLAG_ZLIB = 0x01

ENCODINGS = ("fp32", "fp16", "int8", "int8-channel")

_ENCODING_CODES = {"fp32": 1, "fp16": 2, "int8": 3, "int8-channel": 4}
_ENCODING_NAMES = {code: name for name, code in _ENCODING_CODES.items()}
_ELEMENT_DTYPES = {
    "fp32": np.dtype("<f4"),
    "fp16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "int8-channel": np.dtype("i1"),
}
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}

_PREFIX = struct.Struct("<4sBBBBB3s")  # magic, version, dtype, encoding, flags, ndim, reserved
_LENGTH = struct.Struct("<I")
_FP16_MAX = float(np.finfo(np.float16).max)
_INT8_LEVELS = 254  # steps across [lo, hi]; one spare level absorbs zero-point rounding


class WireError(IsplitError):
    """A tensor cannot be encoded, or a message is not a valid isplit wire message."""


def encode(tensor: torch.Tensor, encoding: str = "fp16", *, compress: bool = False) -> bytes:
    """Encode a floating-point tensor (any shape, e.g. ``(N, C, H, W)``) as one wire message.

    ``encoding`` is one of :data:`ENCODINGS`; ``int8-channel`` quantises each channel of dim 1
    separately. ``compress`` zlib-compresses the payload (worth it mainly for int8).
    Raises :class:`WireError` for an unknown encoding, a non-float tensor, more than 8 dims,
    values an fp16 cannot hold, or non-finite values under an int8 encoding.
    """
    _check_encoding(encoding)
    if tensor.dtype not in _DTYPE_CODES:
        allowed = ", ".join(str(d) for d in _DTYPE_CODES)
        raise WireError(f"cannot encode a tensor of dtype {tensor.dtype}; expected one of {allowed}")
    if tensor.dim() > MAX_NDIM:
        raise WireError(f"cannot encode a tensor with {tensor.dim()} dims; at most {MAX_NDIM} are allowed")
    if encoding == "int8-channel" and tensor.dim() < 2:
        raise WireError(f"int8-channel quantises over dim 1 and needs >= 2 dims, got shape {tuple(tensor.shape)}")

    values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    qparams = b""
    if encoding == "fp32":
        elements = values.astype("<f4", copy=False)
    elif encoding == "fp16":
        elements = _to_fp16(values)
    else:
        axis = 1 if encoding == "int8-channel" else None
        elements, scales, zero_points = _quantise_int8(values, axis)
        qparams = scales.astype("<f4").tobytes() + zero_points.astype("<i4").tobytes()

    payload = elements.tobytes()
    flags = 0
    if compress:
        payload = zlib.compress(payload, 6)
        flags |= FLAG_ZLIB
    prefix = _PREFIX.pack(
        MAGIC, VERSION, _DTYPE_CODES[tensor.dtype], _ENCODING_CODES[encoding], flags, tensor.dim(), b"\0\0\0"
    )
    shape = struct.pack(f"<{tensor.dim()}I", *tensor.shape)
    return b"".join((prefix, shape, qparams, _LENGTH.pack(len(payload)), payload))


def decode(
    data: bytes,
    *,
    expected_shape: Sequence[int | None] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Decode one wire message into a float32 tensor of the shape its header declares.

    ``expected_shape``, when given, must match the message's shape; a ``None`` entry accepts
    any size in that dim (e.g. ``(None, 4, 4, 4)`` for a batch of any size). ``max_bytes``
    bounds both the message length and the decoded float32 tensor, in bytes.
    Raises :class:`WireError`, naming what is wrong, for anything but a valid message.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a bytes-like message, got {type(data).__name__}")
    view = data if isinstance(data, bytes) else memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise WireError(f"oversized message: {len(view)} bytes exceeds the limit of {max_bytes} bytes")
    _need(view, _PREFIX.size, "header")
    magic, version, dtype_code, encoding_code, flags, ndim, reserved = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}: not an isplit wire message (expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"unsupported wire format version {version}; this decoder reads version {VERSION}")
    if dtype_code not in _DTYPE_CODES.values():
        raise WireError(f"unknown dtype code {dtype_code}; expected one of {sorted(_DTYPE_CODES.values())}")
    encoding = _ENCODING_NAMES.get(encoding_code)
    if encoding is None:
        raise WireError(f"unknown encoding code {encoding_code}; expected one of {sorted(_ENCODING_NAMES)}")
    if flags & ~FLAG_ZLIB:
        raise WireError(f"unknown flags 0x{flags:02x}; only bit 0 (zlib) is defined")
    if reserved != b"\0\0\0":
        raise WireError("reserved header bytes 9-11 must be zero")
    if ndim > MAX_NDIM:
        raise WireError(f"ndim {ndim} exceeds the maximum of {MAX_NDIM}")

    offset = _PREFIX.size
    _need(view, offset + 4 * ndim, "shape")
    shape = struct.unpack_from(f"<{ndim}I", view, offset)
    offset += 4 * ndim
    if expected_shape is not None and not _shape_matches(shape, expected_shape):
        raise WireError(f"shape mismatch: message holds {shape}, expected {_format_shape(expected_shape)}")
    numel = math.prod(shape)
    if numel * 4 > max_bytes:
        raise WireError(
            f"oversized tensor: shape {shape} decodes to {numel * 4} bytes of float32, "
            f"over the limit of {max_bytes} bytes"
        )
    if math.prod(max(d, 1) for d in shape) * 4 > max_bytes:
        # An empty dim does not excuse huge ones (numpy and torch cannot hold such shapes).
        raise WireError(f"oversized shape {shape}: its non-empty dims alone exceed the limit of {max_bytes} bytes")

    scales = zero_points = None
    if encoding in ("int8", "int8-channel"):
        if encoding == "int8-channel" and ndim < 2:
            raise WireError(f"int8-channel needs >= 2 dims, message shape is {shape}")
        channels = 1 if encoding == "int8" else shape[1]
        _need(view, offset + 8 * channels, "quantisation parameters")
        scales = np.frombuffer(view, dtype="<f4", count=channels, offset=offset)
        zero_points = np.frombuffer(view, dtype="<i4", count=channels, offset=offset + 4 * channels)
        offset += 8 * channels
        _check_qparams(scales, zero_points)

    _need(view, offset + _LENGTH.size, "payload length")
    (stored_len,) = _LENGTH.unpack_from(view, offset)
    offset += _LENGTH.size
    total = offset + stored_len
    if len(view) < total:
        raise WireError(f"truncated message: expected {total} bytes, got {len(view)}")
    if len(view) > total:
        raise WireError(
            f"{len(view) - total} trailing bytes after the payload: expected {total} bytes, got {len(view)}"
        )

    element = _ELEMENT_DTYPES[encoding]
    raw_len = numel * element.itemsize
    stored = view[offset:total]
    raw = _inflate(stored, raw_len) if flags & FLAG_ZLIB else stored
    if len(raw) != raw_len:
        raise WireError(f"payload holds {len(raw)} bytes, expected {raw_len} for shape {shape} as {encoding}")

    elements = np.frombuffer(raw, dtype=element, count=numel).reshape(shape)
    values = elements.astype(np.float32)
    if scales is not None:
        bshape = (1, shape[1]) + (1,) * (ndim - 2) if encoding == "int8-channel" else ()
        with np.errstate(over="ignore"):
            values -= zero_points.astype(np.float32).reshape(bshape)
            values *= scales.reshape(bshape)
    return torch.from_numpy(values)


def payload_nbytes(shape: Sequence[int], encoding: str) -> int:
    """Uncompressed payload size in bytes of a tensor of ``shape`` under ``encoding``.

    For a per-image estimate pass one image's code shape, e.g. ``(C, H, W)``.
    """
    _check_encoding(encoding)
    return math.prod(shape) * _ELEMENT_DTYPES[encoding].itemsize


def encoded_nbytes(shape: Sequence[int], encoding: str) -> int:
    """Exact size in bytes of ``encode(t, encoding, compress=False)`` for ``t`` of ``shape``."""
    _check_encoding(encoding)
    if encoding == "int8":
        qparams = 8
    elif encoding == "int8-channel":
        if len(shape) < 2:
            raise WireError(f"int8-channel needs >= 2 dims, got shape {tuple(shape)}")
        qparams = 8 * shape[1]
    else:
        qparams = 0
    return _PREFIX.size + 4 * len(shape) + qparams + _LENGTH.size + payload_nbytes(shape, encoding)


def _check_encoding(encoding: str) -> None:
    if encoding not in _ENCODING_CODES:
        raise WireError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def _need(view, end: int, what: str) -> None:
    if len(view) < end:
        raise WireError(f"truncated message: expected at least {end} bytes to read the {what}, got {len(view)}")


def _shape_matches(shape: tuple[int, ...], expected: Sequence[int | None]) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected, strict=True))


def _format_shape(shape: Sequence[int | None]) -> str:
    dims = ", ".join("N" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


def _check_qparams(scales: np.ndarray, zero_points: np.ndarray) -> None:
    for channel, (scale, zero_point) in enumerate(zip(scales.tolist(), zero_points.tolist(), strict=True)):
        if not math.isfinite(scale):
            raise WireError(f"non-finite scale {scale} for channel {channel}")
        if scale <= 0:
            raise WireError(f"scale must be > 0, got {scale} for channel {channel}")
        if not -128 <= zero_point <= 127:
            raise WireError(f"zero_point {zero_point} for channel {channel} is outside [-128, 127]")


def _inflate(stored, raw_len: int) -> bytes:
    """Inflate a zlib payload, reading at most ``raw_len + 1`` bytes out (bomb-safe)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(stored, raw_len + 1)
    except zlib.error as exc:
        raise WireError(f"corrupt zlib payload: {exc}") from None
    if len(raw) > raw_len or inflater.unconsumed_tail:
        raise WireError(f"compressed payload inflates beyond the {raw_len} bytes its header declares")
    if not inflater.eof:
        raise WireError(f"truncated zlib payload: inflated {len(raw)} of {raw_len} bytes, stream incomplete")
    if inflater.unused_data:
        raise WireError(f"{len(inflater.unused_data)} bytes after the end of the zlib stream")
    return raw


def _to_fp16(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    too_big = finite & (np.abs(values) > _FP16_MAX)
    if too_big.any():
        worst = float(np.abs(values[too_big]).max())
        raise WireError(f"value {worst:g} exceeds the fp16 range (±{_FP16_MAX:g}); use fp32 or int8")
    return values.astype("<f2")


def _quantise_int8(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine int8 quantisation, per tensor (``axis=None``) or per index of ``axis``.

    Returns ``(q int8 like values, scale float32 (K,), zero_point int32 (K,))``. Each range
    ``[lo, hi]`` is widened to hold 0 and mapped onto 254 steps (scale rounded up to float32),
    so after rounding the zero point every element stays within ``scale / 2`` of its value.
    """
    if not np.isfinite(values).all():
        raise WireError("int8 encodings need finite values; the tensor holds NaN or inf (use fp32 or fp16)")
    wide = values.astype(np.float64)
    if axis is None:
        channels, reduce_axes, bshape = 1, None, ()
    else:
        channels = values.shape[axis]
        reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
        bshape = tuple(channels if i == axis else 1 for i in range(values.ndim))
    if wide.size == 0:
        lo = hi = np.zeros(channels)
    else:
        lo = np.minimum(np.atleast_1d(wide.min(axis=reduce_axes)), 0.0)
        hi = np.maximum(np.atleast_1d(wide.max(axis=reduce_axes)), 0.0)
    exact = (hi - lo) / _INT8_LEVELS
    scale = exact.astype(np.float32)
    scale = np.where(scale < exact, np.nextafter(scale, np.float32(np.inf)), scale)
    scale = np.where(hi == lo, np.float32(1.0), np.maximum(scale, np.finfo(np.float32).tiny)).astype(np.float32)
    zero_point = np.clip(np.round(-127.0 - lo / scale), -128, 127)
    scale_b = scale.astype(np.float64).reshape(bshape)
    q = np.clip(np.round(wide / scale_b) + zero_point.reshape(bshape), -128, 127).astype(np.int8)
    return q, scale, zero_point.astype(np.int32)
