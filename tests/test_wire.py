"""The isplit wire format (``isplit.wire``): round trips, the documented layout, refusals."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from isplit import IsplitError, wire

FP16_RELATIVE_ERROR = 2.0**-11  # half a unit in the last place of a 10-bit mantissa


def _header_len(ndim: int) -> int:
    return 12 + 4 * ndim


def _int8_scales(message: bytes, ndim: int, channels: int) -> np.ndarray:
    """The float32 scales as the spec places them: right after the shape."""
    return np.frombuffer(message, dtype="<f4", count=channels, offset=_header_len(ndim))


def _message(
    shape: tuple[int, ...],
    payload: bytes,
    *,
    encoding_code: int = 1,
    dtype_code: int = 1,
    flags: int = 0,
    version: int = 1,
    qparams: bytes = b"",
    length: int | None = None,
) -> bytes:
    """A message assembled by hand, following the layout in the module docstring."""
    header = struct.pack("<4sBBBBB3s", b"ISPW", version, dtype_code, encoding_code, flags, len(shape), b"\0\0\0")
    header += struct.pack(f"<{len(shape)}I", *shape) + qparams
    return header + struct.pack("<I", len(payload) if length is None else length) + payload


def _codes(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


# --- round trips -----------------------------------------------------------------------------


def test_fp32_round_trip_is_exact() -> None:
    codes = _codes(2, 8, 4, 4)
    assert torch.equal(wire.decode(wire.encode(codes, "fp32")), codes)


def test_fp32_carries_non_finite_values() -> None:
    codes = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    decoded = wire.decode(wire.encode(codes, "fp32"))
    assert torch.equal(decoded.isnan(), codes.isnan())
    assert decoded[2] == float("inf") and decoded[3] == -float("inf")


def test_fp16_round_trip_is_within_half_precision() -> None:
    codes = _codes(3, 16, 2, 2)
    decoded = wire.decode(wire.encode(codes, "fp16"))
    assert decoded.dtype == torch.float32
    assert torch.all((decoded - codes).abs() <= codes.abs() * FP16_RELATIVE_ERROR + 1e-7)


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
@pytest.mark.parametrize("compress", [False, True])
def test_every_encoding_round_trips_shape_and_returns_float32(encoding: str, compress: bool) -> None:
    codes = _codes(2, 4, 3, 5)
    decoded = wire.decode(wire.encode(codes, encoding, compress=compress), expected_shape=(2, 4, 3, 5))
    assert decoded.shape == codes.shape
    assert decoded.dtype == torch.float32
    assert torch.allclose(decoded, codes, atol=0.1)


def test_int8_error_is_at_most_half_a_quantisation_step() -> None:
    codes = _codes(4, 8, 4, 4)
    message = wire.encode(codes, "int8")
    (scale,) = _int8_scales(message, codes.dim(), 1)
    assert scale == pytest.approx((codes.max() - codes.min()).item() / 254, rel=1e-6)
    error = (wire.decode(message) - codes).abs().max().item()
    assert error <= scale / 2 * (1 + 1e-5)


def test_int8_channel_keeps_each_channel_within_its_own_half_step() -> None:
    # Channel ranges six orders of magnitude apart: one scale per channel keeps the small one.
    codes = _codes(2, 3, 4, 4) * torch.tensor([1000.0, 1.0, 0.001]).view(1, 3, 1, 1)
    message = wire.encode(codes, "int8-channel")
    scales = _int8_scales(message, codes.dim(), 3)
    error = (wire.decode(message) - codes).abs().amax(dim=(0, 2, 3))
    assert torch.all(error <= torch.from_numpy(scales.copy()) / 2 * (1 + 1e-5))
    per_tensor_error = (wire.decode(wire.encode(codes, "int8")) - codes).abs().amax(dim=(0, 2, 3))
    assert error[2] < per_tensor_error[2] / 100


@pytest.mark.parametrize("encoding", ["int8", "int8-channel"])
def test_int8_represents_zero_exactly(encoding: str) -> None:
    codes = torch.relu(_codes(2, 4, 4, 4))  # like a ReLU activation: many exact zeros
    decoded = wire.decode(wire.encode(codes, encoding))
    assert torch.all(decoded[codes == 0] == 0)


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_constant_and_all_zero_tensors_round_trip(encoding: str) -> None:
    zeros, constant = torch.zeros(2, 3, 2), torch.full((2, 3, 2), -7.25)
    assert torch.equal(wire.decode(wire.encode(zeros, encoding)), zeros)
    # A constant sits on the end of its int8 range: exact up to float32 rounding of the scale.
    assert torch.allclose(wire.decode(wire.encode(constant, encoding)), constant, rtol=1e-6, atol=0)


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0, 2)])
def test_empty_tensors_round_trip(encoding: str, shape: tuple[int, ...]) -> None:
    assert wire.decode(wire.encode(torch.zeros(shape), encoding)).shape == shape


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_scalar_tensor_round_trips(encoding: str) -> None:
    decoded = wire.decode(wire.encode(torch.tensor(3.0), encoding))
    assert decoded.shape == () and decoded.item() == pytest.approx(3.0, abs=0.02)


@pytest.mark.parametrize(
    ("dtype", "code"), [(torch.float32, 1), (torch.float16, 2), (torch.bfloat16, 3), (torch.float64, 4)]
)
def test_float_dtypes_are_accepted_and_recorded(dtype: torch.dtype, code: int) -> None:
    codes = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=dtype)
    message = wire.encode(codes, "fp32")
    assert message[5] == code
    assert torch.equal(wire.decode(message), codes.float())


def test_compression_shrinks_a_sparse_int8_payload() -> None:
    codes = torch.zeros(8, 64, 8, 8)
    codes[:, :4] = 1.0
    plain, packed = wire.encode(codes, "int8"), wire.encode(codes, "int8", compress=True)
    assert len(packed) < len(plain) / 10
    assert torch.equal(wire.decode(packed), wire.decode(plain))


# --- the documented layout ---------------------------------------------------------------------


def test_header_follows_the_documented_layout() -> None:
    codes = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    message = wire.encode(codes, "fp16", compress=False)
    magic, version, dtype, encoding, flags, ndim, reserved = struct.unpack_from("<4sBBBBB3s", message)
    assert (magic, version, dtype, encoding, flags, ndim, reserved) == (b"ISPW", 1, 1, 2, 0, 3, b"\0\0\0")
    assert struct.unpack_from("<3I", message, 12) == (1, 2, 3)
    (length,) = struct.unpack_from("<I", message, 24)
    assert length == 12 and len(message) == 28 + 12
    assert np.array_equal(np.frombuffer(message[28:], dtype="<f2"), np.arange(6, dtype=np.float16))


def test_per_channel_parameters_follow_the_shape() -> None:
    codes = torch.stack([torch.full((2, 2), -1.0), torch.full((2, 2), 2.0)]).unsqueeze(0)  # (1, 2, 2, 2)
    message = wire.encode(codes, "int8-channel", compress=True)
    assert message[6] == 4 and message[7] == 1  # encoding int8-channel, flags: zlib
    scales = struct.unpack_from("<2f", message, 28)
    zero_points = struct.unpack_from("<2i", message, 36)
    assert scales == pytest.approx((1 / 254, 2 / 254))
    assert all(-128 <= z <= 127 for z in zero_points)
    (length,) = struct.unpack_from("<I", message, 44)
    assert len(message) == 48 + length


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_size_helpers_match_encode(encoding: str) -> None:
    shape = (2, 8, 4, 4)
    message = wire.encode(torch.ones(shape), encoding)
    assert wire.encoded_nbytes(shape, encoding) == len(message)
    assert wire.payload_nbytes(shape[1:], encoding) * 2 == wire.payload_nbytes(shape, encoding)


def test_payload_nbytes_is_the_bytes_per_element_times_elements() -> None:
    assert [wire.payload_nbytes((8, 4, 4), e) for e in wire.ENCODINGS] == [512, 256, 128, 128]


# --- refusals on encode ----------------------------------------------------------------------


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(wire.WireError, ValueError) and issubclass(wire.WireError, IsplitError)


def test_unknown_encoding_is_refused_naming_the_choices() -> None:
    with pytest.raises(
        wire.WireError, match=r"unknown encoding 'bf16'; expected one of fp32, fp16, int8, int8-channel"
    ):
        wire.encode(torch.zeros(2), "bf16")
    with pytest.raises(wire.WireError, match="unknown encoding"):
        wire.payload_nbytes((2,), "int4")


def test_integer_tensors_are_refused() -> None:
    with pytest.raises(wire.WireError, match=r"dtype torch.int64"):
        wire.encode(torch.arange(4), "fp32")


def test_fp16_refuses_values_beyond_its_range() -> None:
    with pytest.raises(wire.WireError, match=r"value 70000 exceeds the fp16 range"):
        wire.encode(torch.tensor([1.0, -70000.0]), "fp16")


def test_int8_refuses_non_finite_values() -> None:
    with pytest.raises(wire.WireError, match="NaN or inf"):
        wire.encode(torch.tensor([1.0, float("nan")]), "int8")


def test_int8_channel_needs_a_channel_dim() -> None:
    with pytest.raises(wire.WireError, match=r"needs >= 2 dims, got shape \(5,\)"):
        wire.encode(torch.zeros(5), "int8-channel")


# --- refusals on decode ----------------------------------------------------------------------


def test_bad_magic_is_refused() -> None:
    message = b"PK\x03\x04" + wire.encode(torch.zeros(2))[4:]
    with pytest.raises(wire.WireError, match=r"bad magic b'PK\\x03\\x04': not an isplit wire message"):
        wire.decode(message)


def test_other_versions_are_refused_by_number() -> None:
    with pytest.raises(wire.WireError, match="unsupported wire format version 2; this decoder reads version 1"):
        wire.decode(_message((2,), bytes(8), version=2))


def test_truncated_message_names_expected_and_actual_length() -> None:
    message = wire.encode(torch.zeros(2, 4), "fp32")  # 12 + 8 + 4 + 32 = 56 bytes
    with pytest.raises(wire.WireError, match=r"truncated message: expected 56 bytes, got 50"):
        wire.decode(message[:50])
    with pytest.raises(
        wire.WireError, match=r"truncated message: expected at least 12 bytes to read the header, got 3"
    ):
        wire.decode(message[:3])


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(wire.WireError, match=r"2 trailing bytes after the payload: expected 56 bytes, got 58"):
        wire.decode(wire.encode(torch.zeros(2, 4), "fp32") + b"xx")


def test_shape_mismatch_names_both_shapes() -> None:
    message = wire.encode(torch.zeros(2, 4, 4, 4))
    with pytest.raises(wire.WireError, match=r"shape mismatch: message holds \(2, 4, 4, 4\), expected \(N, 8, 4, 4\)"):
        wire.decode(message, expected_shape=(None, 8, 4, 4))
    assert wire.decode(message, expected_shape=(None, 4, 4, 4)).shape == (2, 4, 4, 4)


def test_oversized_message_is_refused() -> None:
    with pytest.raises(wire.WireError, match=r"oversized message: 56 bytes exceeds the limit of 40 bytes"):
        wire.decode(wire.encode(torch.zeros(2, 4), "fp32"), max_bytes=40)


def test_oversized_tensor_is_refused_from_the_header_alone() -> None:
    # A 40-byte message declaring 2**30 elements: refused before any payload is read.
    message = _message((1 << 15, 1 << 15), b"")
    with pytest.raises(wire.WireError, match=r"oversized tensor: shape \(32768, 32768\) decodes to 4294967296 bytes"):
        wire.decode(message)


def test_zip_bomb_is_refused_without_inflating_it() -> None:
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~65 kB
    declared_small = _message((4,), bomb, flags=1)
    with pytest.raises(wire.WireError, match="inflates beyond the 16 bytes its header declares"):
        wire.decode(declared_small)
    declared_large = _message((64 << 20,), bomb, flags=1)
    with pytest.raises(wire.WireError, match="oversized tensor"):
        wire.decode(declared_large)


def test_corrupt_and_incomplete_zlib_payloads_are_refused() -> None:
    with pytest.raises(wire.WireError, match="corrupt zlib payload"):
        wire.decode(_message((4,), b"not zlib at all", flags=1))
    with pytest.raises(wire.WireError, match=r"truncated zlib payload"):
        wire.decode(_message((4,), zlib.compress(bytes(16))[:-6], flags=1))


@pytest.mark.parametrize(
    ("scale", "message"),
    [(float("nan"), "non-finite scale nan for channel 0"), (float("inf"), "non-finite scale inf"), (0.0, "> 0")],
)
def test_bad_scales_are_refused(scale: float, message: str) -> None:
    qparams = struct.pack("<fi", scale, 0)
    with pytest.raises(wire.WireError, match=message):
        wire.decode(_message((4,), bytes(4), encoding_code=3, qparams=qparams))


def test_zero_point_outside_int8_is_refused() -> None:
    qparams = struct.pack("<fi", 1.0, 300)
    with pytest.raises(wire.WireError, match=r"zero_point 300 for channel 0 is outside \[-128, 127\]"):
        wire.decode(_message((4,), bytes(4), encoding_code=3, qparams=qparams))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"encoding_code": 9}, "unknown encoding code 9"),
        ({"dtype_code": 0}, "unknown dtype code 0"),
        ({"flags": 0x80}, "unknown flags 0x80"),
    ],
)
def test_unknown_codes_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(_message((2,), bytes(8), **fields))


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(wire.WireError, match="expected a bytes-like message, got str"):
        wire.decode("ISPW")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted() -> None:
    message = wire.encode(torch.ones(3), "fp32")
    assert torch.equal(wire.decode(bytearray(message)), torch.ones(3))
    assert torch.equal(wire.decode(memoryview(message)), torch.ones(3))


# --- properties ------------------------------------------------------------------------------

_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
_finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def _valid_messages(draw) -> bytes:
    encoding = draw(st.sampled_from(wire.ENCODINGS))
    shape = draw(_shapes.filter(lambda s: encoding != "int8-channel" or len(s) >= 2))
    values = draw(arrays(np.float32, shape, elements=_finite))
    return wire.encode(torch.from_numpy(values), encoding, compress=draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(values=arrays(np.float32, _shapes, elements=_finite), encoding=st.sampled_from(wire.ENCODINGS))
def test_round_trip_error_is_bounded_for_any_finite_tensor(values: np.ndarray, encoding: str) -> None:
    if encoding == "int8-channel" and values.ndim < 2:
        encoding = "int8"
    codes = torch.from_numpy(values)
    decoded = wire.decode(wire.encode(codes, encoding), expected_shape=codes.shape)
    span = float(max(values.max(initial=0), 0) - min(values.min(initial=0), 0))
    if encoding == "fp32":
        bound = torch.zeros_like(codes)
    elif encoding == "fp16":
        bound = codes.abs() * FP16_RELATIVE_ERROR + 2.0**-25  # relative, or subnormal spacing
    else:
        bound = torch.full_like(codes, span / 254 / 2 * (1 + 1e-5) + 1e-30)
    assert torch.all((decoded - codes).abs() <= bound)


def _decode_or_wire_error(data: bytes) -> None:
    try:
        decoded = wire.decode(data, max_bytes=1 << 20)
    except wire.WireError:
        return
    assert decoded.dtype == torch.float32


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=256))
def test_random_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    _decode_or_wire_error(data)
    _decode_or_wire_error(b"ISPW\x01" + data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=_valid_messages(),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(-8, 8),
)
def test_mutated_messages_only_ever_raise_wire_error(message: bytes, edits: list, cut: int) -> None:
    mutated = bytearray(message)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    _decode_or_wire_error(bytes(mutated))
    _decode_or_wire_error(bytes(mutated[: len(mutated) + cut]) if cut < 0 else bytes(mutated) + bytes(cut))
