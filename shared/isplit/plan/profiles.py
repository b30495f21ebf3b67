"""The deployment a plan is made for: device, link and server profiles, constraints, the named
presets (documented *assumptions*, not measurements), the spec users write (CLI flags, API
bodies) and how it resolves to a :class:`Deployment`; the device measurement file that
``isplit edge profile`` writes and its reader.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from isplit import IsplitError
from isplit.plan.costs import Encoding

CONSTRAINTS = ("max_head_flops_fraction", "max_latency_ms", "max_payload_bytes", "min_accuracy")
MEASUREMENT_FORMAT = "isplit-device-profile/1"


# -- device measurements (`isplit edge profile`) --------------------------------------------


class CutTiming(BaseModel):
    """Measured time of the head ending at one cut, median over repeats, milliseconds:
    ``head_ms`` alone, ``bottleneck_head_ms`` with the bottleneck encoder the trainer inserts
    (``DeviceMeasurement.bottleneck_ratio``) after it, as an exported edge head runs."""

    model_config = ConfigDict(extra="forbid")

    head_ms: float = Field(ge=0, allow_inf_nan=False)
    bottleneck_head_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class DeviceMeasurement(BaseModel):
    """What ``isplit edge profile`` writes: the model's heads timed on the machine it ran on.

    ``gflops`` is the effective rate of the whole model (``total_flops / total_ms``);
    ``encode_mb_per_s`` is fp32 megabytes (1e6 bytes) per second through ``wire.encode``.
    Per-cut times apply to a model with the same ``total_flops`` and ``input_shape``; for any
    other model only the effective rates are used.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["isplit-device-profile/1"] = MEASUREMENT_FORMAT
    host: str = ""
    machine: str = ""
    torch_threads: int = Field(default=1, ge=1)
    arch: str = ""
    input_shape: list[int] = Field(min_length=3, max_length=3)
    total_flops: int = Field(ge=0)
    total_ms: float = Field(gt=0, allow_inf_nan=False)
    gflops: float = Field(gt=0, allow_inf_nan=False)
    encode_mb_per_s: float = Field(gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=1, ge=1)
    repeats: int = Field(default=1, ge=1)
    bottleneck_ratio: int = Field(default=4, ge=1)
    pause_ms: float = Field(default=0.0, ge=0, description="idle time before each timed call")
    cuts: dict[str, CutTiming]


# -- deployment profiles --------------------------------------------------------------------

_Positive = Field(gt=0, allow_inf_nan=False)


class DeviceProfile(BaseModel):
    """The edge device. ``gflops``: effective GFLOP/s on these models (not the data-sheet
    peak); ``encode_mb_per_s``: how fast it turns fp32 activations into a wire message;
    ``measured``: a profile from ``isplit edge profile`` (per-cut head times win over
    ``gflops`` for the model it was measured on)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    gflops: float = _Positive
    encode_mb_per_s: float = Field(default=500.0, gt=0, allow_inf_nan=False)
    measured: DeviceMeasurement | None = None
    note: str = ""


class LinkProfile(BaseModel):
    """The uplink from device to server: ``uplink_mbps`` (1e6 bit/s), ``rtt_ms`` round trip."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    uplink_mbps: float = _Positive
    rtt_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    note: str = ""


class ServerProfile(BaseModel):
    """The server running the tail: ``gflops`` effective; with ``use_registration_latency`` a
    retrained candidate's tail time is the latency TorchServe measured at registration."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    gflops: float = _Positive
    use_registration_latency: bool = False
    note: str = ""


class Constraints(BaseModel):
    """Limits a deployable cut must meet (None = no limit). ``min_accuracy`` applies to cuts
    the trainer has measured; an unmeasured cut is not excluded by it (its accuracy is unknown)."""

    model_config = ConfigDict(extra="forbid")

    max_head_flops_fraction: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    max_latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_payload_bytes: int | None = Field(default=None, ge=0)
    min_accuracy: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)


# Named presets: round figures for the class of hardware, assumptions to replace by a
# measurement (``isplit edge profile``) or your own figures, never measurements themselves.
DEVICE_PRESETS: dict[str, DeviceProfile] = {
    "mcu": DeviceProfile(
        name="mcu", gflops=0.2, encode_mb_per_s=20,
        note="microcontroller class (Cortex-M7 at ~480 MHz, CMSIS-NN int8 kernels); assumed",
    ),
    "rpi4": DeviceProfile(
        name="rpi4", gflops=5.0, encode_mb_per_s=400,
        note="Raspberry-Pi-4 class (4x Cortex-A72 at 1.5 GHz, PyTorch fp32 on CPU); assumed",
    ),
    "phone": DeviceProfile(
        name="phone", gflops=30.0, encode_mb_per_s=2000,
        note="phone class (recent mid-range SoC, CPU fp32 inference); assumed",
    ),
}  # fmt: skip
LINK_PRESETS: dict[str, LinkProfile] = {
    "lora": LinkProfile(name="lora", uplink_mbps=0.005, rtt_ms=1000, note="LoRa class (~5 kbit/s, ~1 s round trip); assumed"),
    "lte": LinkProfile(name="lte", uplink_mbps=10, rtt_ms=50, note="LTE class (10 Mbit/s uplink, 50 ms round trip); assumed"),
    "wifi": LinkProfile(name="wifi", uplink_mbps=50, rtt_ms=5, note="Wi-Fi class (50 Mbit/s, 5 ms round trip); assumed"),
    "loopback": LinkProfile(name="loopback", uplink_mbps=10_000, rtt_ms=0.1, note="this machine's loopback; assumed"),
}  # fmt: skip
SERVER_PRESETS: dict[str, ServerProfile] = {
    "gpu": ServerProfile(name="gpu", gflops=1000, note="one data-centre GPU at batch 1 (launch-bound); assumed"),
    "cpu": ServerProfile(name="cpu", gflops=100, note="a multi-core server CPU; assumed"),
}


class Deployment(BaseModel):
    """Device, link, server, constraints and the wire encoding of the code."""

    model_config = ConfigDict(extra="forbid")

    device: DeviceProfile
    link: LinkProfile
    server: ServerProfile
    constraints: Constraints = Field(default_factory=Constraints)
    encoding: Encoding = "fp16"


class DeploymentSpec(BaseModel):
    """A deployment as users write it (CLI flags, API bodies and queries): presets by name,
    any figure overriding its preset. Unset parts fall back to ``DEFAULT_DEPLOYMENT``."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(default=None, description=f"device preset: {', '.join(DEVICE_PRESETS)}")
    device_gflops: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    device_profile: DeviceMeasurement | None = Field(default=None, description="from `isplit edge profile`")
    link: str | None = Field(default=None, description=f"link preset: {', '.join(LINK_PRESETS)}")
    uplink_mbps: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    rtt_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    server: str | None = Field(default=None, description=f"server preset: {', '.join(SERVER_PRESETS)}")
    server_gflops: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    use_registration_latency: bool | None = None
    encoding: Encoding | None = None
    max_head_flops_fraction: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    max_latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_payload_bytes: int | None = Field(default=None, ge=0)
    min_accuracy: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _known_presets(self) -> DeploymentSpec:
        for field, presets in (("device", DEVICE_PRESETS), ("link", LINK_PRESETS), ("server", SERVER_PRESETS)):
            value = getattr(self, field)
            if value is not None and value not in presets:
                raise ValueError(f"unknown {field} preset {value!r}; choose one of {', '.join(presets)}")
        if self.device_profile is not None and self.device_gflops is not None:
            raise ValueError("give device_gflops or device_profile, not both")
        return self

    def overlay(self, other: DeploymentSpec) -> DeploymentSpec:
        """This spec with every field ``other`` sets replaced by ``other``'s value."""
        return self.model_copy(
            update={k: getattr(other, k) for k in other.model_fields_set if getattr(other, k) is not None}
        )


#: The CLI's and the API's starting point: a Raspberry-Pi-class device on an LTE-class uplink
#: to a GPU server, no constraints (each is the user's choice).
DEFAULT_DEPLOYMENT = DeploymentSpec(device="rpi4", link="lte", server="gpu")

#: The demo's deployment: a Raspberry-Pi-class device, a 10 Mbit/s uplink (LTE class, 50 ms
#: round trip), a GPU server, and a head budget of at most half of the network's FLOPs.
DEMO_DEPLOYMENT = DeploymentSpec(device="rpi4", link="lte", server="gpu", max_head_flops_fraction=0.5)


def resolve_deployment(spec: DeploymentSpec, base: DeploymentSpec = DEFAULT_DEPLOYMENT) -> Deployment:
    """The concrete :class:`Deployment` of ``spec`` laid over ``base``."""
    s = base.overlay(spec)
    device = DEVICE_PRESETS[s.device or "rpi4"].model_copy()
    if s.device_profile is not None:
        m = s.device_profile
        device = DeviceProfile(
            name=f"measured:{m.host or 'this machine'}",
            gflops=m.gflops,
            encode_mb_per_s=m.encode_mb_per_s,
            measured=m,
            note=f"measured by `isplit edge profile` on {m.host or 'a machine'} ({m.machine}, {m.torch_threads} threads)",
        )
    elif s.device_gflops is not None:
        device = device.model_copy(update={"name": "custom", "gflops": s.device_gflops, "note": "given"})
    link = LINK_PRESETS[s.link or "lte"].model_copy()
    if s.uplink_mbps is not None or s.rtt_ms is not None:
        link = LinkProfile(
            name="custom",
            uplink_mbps=s.uplink_mbps if s.uplink_mbps is not None else link.uplink_mbps,
            rtt_ms=s.rtt_ms if s.rtt_ms is not None else link.rtt_ms,
            note="given" if link.name == "custom" else f"given, over the {link.name} preset",
        )
    server = SERVER_PRESETS[s.server or "gpu"].model_copy()
    if s.server_gflops is not None:
        server = server.model_copy(update={"name": "custom", "gflops": s.server_gflops, "note": "given"})
    if s.use_registration_latency is not None:
        server = server.model_copy(update={"use_registration_latency": s.use_registration_latency})
    return Deployment(
        device=device,
        link=link,
        server=server,
        constraints=Constraints(**{k: getattr(s, k) for k in CONSTRAINTS}),
        encoding=s.encoding or "fp16",
    )


def parse_deployment_spec(data: Mapping[str, Any], where: str = "deployment") -> DeploymentSpec:
    """Validate a user's deployment dict; ``IsplitError`` naming the first bad value."""
    try:
        return DeploymentSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise IsplitError(f"{where}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    value = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}{value}" if loc else f"{msg}{value}"


def load_device_measurement(path: Path) -> DeviceMeasurement:
    """Read a profile written by ``isplit edge profile``; ``IsplitError`` when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IsplitError(f"device profile {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IsplitError(f"device profile {path} is not readable JSON: {exc}") from None
    try:
        return DeviceMeasurement.model_validate(data)
    except ValidationError as exc:
        raise IsplitError(f"device profile {path}: {_first_error(exc)}") from None
