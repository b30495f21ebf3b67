"""Deployment planning: which cut a real edge/link/server deployment can use.

I-SPLIT's importance curve says how well a cut will do; it says nothing about the device that
must run the head, the link that carries the code or the server that runs the tail. This
module joins the two:

* a **cost profile** per cut point (:func:`cut_costs`, computed by every analysis): head and
  tail FLOPs, head parameters, peak head activation memory, raw payload at the cut;
* a **deployment** (:class:`Deployment`): the edge device (effective GFLOP/s, or a profile
  measured by ``isplit edge profile``), the link (uplink Mbit/s, round trip), the server
  (effective GFLOP/s, or the tail latency TorchServe measured at registration) and the
  constraints (``max_head_flops_fraction``, ``max_latency_ms``, ``max_payload_bytes``,
  ``min_accuracy``); named presets are documented *assumptions*, not measurements;
* the **plan** (:func:`make_plan`): per cut, estimated end-to-end latency
  ``head + encode + transfer + tail + rtt`` beside the accuracy signal and the payload; the
  recommended cut (the best I-SPLIT candidate that satisfies the constraints), the Pareto
  front, the all-on-device and all-on-server baselines, the size-only choice under the same
  constraints and, when a constraint limits the choice, which one binds.

The planner is pure arithmetic on these models; measuring (:func:`measure_device`) and file
I/O (:func:`load_device_measurement`, :func:`load_measured`) are kept apart.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from isplit import IsplitError, wire
from isplit.bottleneck import make_bottleneck
from isplit.cuts import CutPoint, probe_forward, split_at
from isplit.importance import CutScore, ImportanceCurve

Encoding = Literal["fp32", "fp16", "int8"]
ENCODINGS: tuple[Encoding, ...] = ("fp32", "fp16", "int8")
CONSTRAINTS = ("max_head_flops_fraction", "max_latency_ms", "max_payload_bytes", "min_accuracy")
MEASUREMENT_FORMAT = "isplit-device-profile/1"


# -- cost profile ---------------------------------------------------------------------------


def layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Forward FLOPs of one call of a conv, transposed conv or linear layer on a batch
    (2 x multiply-accumulates); 0 for any other layer (norms, activations, pooling are
    memory-bound and left out, as usual in split-computing cost models)."""
    if isinstance(module, nn.Conv2d):
        macs = out.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    elif isinstance(module, nn.ConvTranspose2d):
        macs = inp.numel() * (module.out_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    elif isinstance(module, nn.Linear):
        macs = out.numel() * module.in_features
    else:
        return 0
    return 2 * macs


class CutCost(BaseModel):
    """What running the network up to (and including) ``module`` costs, per image.

    FLOPs are forward FLOPs (see :func:`layer_flops`); ``head_param_bytes`` is fp32;
    ``head_peak_activation_bytes`` is the largest ``input + output`` of one head layer in fp32
    (what a layer-by-layer runtime must hold at once; residual blocks also keep their skip
    input, which this lower bound leaves out); ``payload_bytes`` is the raw tensor at the cut
    under each wire encoding (no bottleneck, no header).
    """

    module: str
    head_flops: int
    tail_flops: int
    head_flops_fraction: float
    head_params: int
    head_param_bytes: int
    head_peak_activation_bytes: int
    payload_bytes: dict[Encoding, int]


class CostProfile(BaseModel):
    """Cost of every cut point of one model (``cuts`` in network order, skipped ones included).

    ``input_shape`` is ``(C, H, W)``; ``input_bytes`` is the image as 8-bit pixels (what an
    all-on-server deployment sends).
    """

    input_shape: list[int]
    input_bytes: int
    total_flops: int
    total_params: int
    cuts: list[CutCost]

    def cut(self, module: str) -> CutCost:
        for c in self.cuts:
            if c.module == module:
                return c
        raise KeyError(module)


def cut_costs(model: nn.Module, input_shape: Sequence[int], points: Sequence[CutPoint | CutScore]) -> CostProfile:
    """The cost profile of ``model`` for one ``(C, H, W)`` input at each of ``points``.

    One forward pass of a zero image: every leaf module reports its FLOPs and activation size
    in execution order, every cut point the moment its output is ready; a cut's head is all that
    ran before (true at single-tensor cut points, where nothing computed later is needed).
    """
    events: list[tuple[str, Any]] = []  # ("layer", (flops, params, act_bytes)) or ("cut", name)
    seen_params: set[int] = set()
    cut_names = {p.module for p in points}

    def leaf_hook(m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
        fresh = [p for p in m.parameters(recurse=False) if id(p) not in seen_params]
        seen_params.update(id(p) for p in fresh)
        act = 4 * ((x.numel() if x is not None else 0) + (out.numel() if isinstance(out, torch.Tensor) else 0))
        events.append(("layer", (layer_flops(m, x, out) if x is not None else 0, sum(p.numel() for p in fresh), act)))

    def cut_hook(name: str) -> Callable[..., None]:
        return lambda _m, _i, _o: events.append(("cut", name))

    hooks = []
    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append((m, leaf_hook))
        if name in cut_names:
            hooks.append((m, cut_hook(name)))  # registered after, so it runs after its children's
    probe_forward(model, input_shape, hooks)
    flops = params = peak = 0
    at_cut: dict[str, tuple[int, int, int]] = {}
    for kind, value in events:
        if kind == "layer":
            flops, params, peak = flops + value[0], params + value[1], max(peak, value[2])
        else:
            at_cut.setdefault(value, (flops, params, peak))
    total = max(flops, 1)
    cuts = []
    for p in points:
        head_flops, head_params, head_peak = at_cut[p.module]
        cuts.append(
            CutCost(
                module=p.module,
                head_flops=head_flops,
                tail_flops=flops - head_flops,
                head_flops_fraction=head_flops / total,
                head_params=head_params,
                head_param_bytes=4 * head_params,
                head_peak_activation_bytes=head_peak,
                payload_bytes={e: wire.payload_nbytes(p.output_shape, e) for e in ENCODINGS},
            )
        )
    return CostProfile(
        input_shape=list(input_shape),
        input_bytes=math.prod(input_shape),
        total_flops=flops,
        total_params=sum(p.numel() for p in model.parameters()),
        cuts=cuts,
    )


# -- measurements ---------------------------------------------------------------------------


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


class MeasuredCut(BaseModel):
    """What the trainer measured for a retrained candidate (a ``TrainingResult``'s figures).

    ``accuracy`` in [0, 1] (on the analysed class subset when there is one);
    ``bytes_per_image``: the bottleneck code on the wire per encoding; ``head_flops`` and
    ``tail_flops`` include the bottleneck encoder and decoder; ``latency_ms`` is the network +
    tail time TorchServe answered in at registration (one image, the trainer's link).
    """

    accuracy: float | None = None
    accuracy_original: float | None = None
    bytes_per_image: dict[str, int] = Field(default_factory=dict)
    head_flops: int | None = None
    tail_flops: int | None = None
    latency_ms: float | None = None


def measured_from_results(results: Iterable[Mapping[str, Any]], *, subset: bool) -> dict[str, MeasuredCut]:
    """``{cut: MeasuredCut}`` from ``TrainingResult`` dicts; failed results are left out.

    With ``subset`` the subset accuracies are used (when the trainer reported them).
    """
    out: dict[str, MeasuredCut] = {}
    for r in results:
        if not r or r.get("status") != "succeeded" or r.get("accuracy_split") is None:
            continue
        acc, orig = r.get("accuracy_split"), r.get("accuracy_original")
        if subset and r.get("accuracy_split_subset") is not None:
            acc, orig = r["accuracy_split_subset"], r.get("accuracy_original_subset", orig)
        out[str(r["cut"])] = MeasuredCut(
            accuracy=acc,
            accuracy_original=orig,
            bytes_per_image=dict(r.get("bytes_per_image") or {}),
            head_flops=r.get("head_flops"),
            tail_flops=r.get("tail_flops"),
            latency_ms=r.get("latency_ms"),
        )
    return out


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


# -- the plan -------------------------------------------------------------------------------


class PlannedCut(BaseModel):
    """One cut under a deployment. Times are milliseconds per image; ``payload_bytes`` per
    image on the wire (the bottleneck code when the trainer measured the cut, else the raw
    tensor: ``payload_source``); ``accuracy`` is measured (None until the trainer reports);
    ``cui_rank`` is the cut's place in the I-SPLIT ranking (1 = best); ``violates`` names the
    constraints the cut breaks."""

    module: str
    candidate: bool
    cui_rank: int
    log10_cui: float
    accuracy: float | None
    head_flops: int
    head_flops_fraction: float
    head_params: int
    head_param_bytes: int
    head_peak_activation_bytes: int
    payload_bytes: int
    payload_source: Literal["raw", "bottleneck"]
    head_ms: float
    head_source: Literal["flops", "measured"]
    encode_ms: float
    transfer_ms: float
    tail_ms: float
    rtt_ms: float
    latency_ms: float
    feasible: bool
    violates: list[str]


class Baseline(BaseModel):
    """Not splitting: the whole network on the device, or the image sent to the server."""

    head_flops_fraction: float
    payload_bytes: int
    latency_ms: float
    accuracy: float | None
    feasible: bool
    violates: list[str]


class Plan(BaseModel):
    """The answer: ``recommended`` (a cut name or None), ``pareto`` (cut names, network
    order), ``cuts`` (one per non-skipped cut point, network order), ``binding`` (the
    constraints that limit the choice; empty when the unconstrained best cut is feasible).

    ``recommended_is_candidate`` is False when no I-SPLIT candidate (local maximum or global
    maximum of the curve) is feasible and the best feasible other cut is offered instead;
    ``unconstrained`` is the curve's best cut; ``size_only`` the size baseline's pick under
    the same constraints; ``best_measured`` the feasible cut with the highest measured accuracy.
    """

    recommended: str | None
    recommended_is_candidate: bool
    unconstrained: str
    size_only: str | None
    best_measured: str | None
    pareto: list[str]
    binding: list[str]
    binding_detail: str
    baselines: dict[str, Baseline]
    cuts: list[PlannedCut]
    deployment: Deployment
    notes: list[str]

    def cut(self, module: str) -> PlannedCut:
        for c in self.cuts:
            if c.module == module:
                return c
        raise KeyError(module)

    def feasible_ranking(self) -> list[str]:
        """Feasible cuts, best first: I-SPLIT candidates by CUI rank, then the other cuts."""
        ok = [c for c in self.cuts if c.feasible]
        return [c.module for c in sorted(ok, key=lambda c: (not c.candidate, c.cui_rank))]


def _violations(c: Constraints, head_fraction: float, latency_ms: float, payload: int, acc: float | None) -> list[str]:
    out = []
    if c.max_head_flops_fraction is not None and head_fraction > c.max_head_flops_fraction:
        out.append("max_head_flops_fraction")
    if c.max_latency_ms is not None and latency_ms > c.max_latency_ms:
        out.append("max_latency_ms")
    if c.max_payload_bytes is not None and payload > c.max_payload_bytes:
        out.append("max_payload_bytes")
    if c.min_accuracy is not None and acc is not None and acc < c.min_accuracy:
        out.append("min_accuracy")
    return out


def transfer_ms(payload_bytes: int, uplink_mbps: float) -> float:
    """Milliseconds to push ``payload_bytes`` through an uplink of ``uplink_mbps`` (1e6 bit/s)."""
    return payload_bytes * 8 / (uplink_mbps * 1e3)


def _flops_ms(flops: int, gflops: float) -> float:
    return flops / (gflops * 1e6)


def _measurement_applies(m: DeviceMeasurement | None, costs: CostProfile) -> bool:
    return m is not None and m.total_flops == costs.total_flops and list(m.input_shape) == costs.input_shape


def _plan_cut(
    point: CutScore,
    cost: CutCost,
    rank: int,
    candidate: bool,
    m: MeasuredCut | None,
    d: Deployment,
    measured_device: bool,
) -> PlannedCut:
    timing = d.device.measured.cuts.get(point.module) if measured_device and d.device.measured else None
    head_flops = m.head_flops if m is not None and m.head_flops is not None else cost.head_flops
    bottlenecked = head_flops > cost.head_flops  # the trainer measured a head with its encoder
    if timing is not None and bottlenecked and timing.bottleneck_head_ms is not None:
        head_ms = timing.bottleneck_head_ms
    elif timing is not None:
        # An encoder the profile did not time runs at the device's effective rate.
        head_ms = timing.head_ms + _flops_ms(head_flops - cost.head_flops, d.device.gflops)
    else:
        head_ms = _flops_ms(head_flops, d.device.gflops)
    if m is not None and d.encoding in m.bytes_per_image:
        payload, source = int(m.bytes_per_image[d.encoding]), "bottleneck"
        elements = payload // wire.payload_nbytes([1], d.encoding)
    else:
        payload, source = cost.payload_bytes[d.encoding], "raw"
        elements = cost.payload_bytes["fp32"] // 4
    encode = 4 * elements / (d.device.encode_mb_per_s * 1e3)
    tail_flops = m.tail_flops if m is not None and m.tail_flops is not None else cost.tail_flops
    if d.server.use_registration_latency and m is not None and m.latency_ms is not None:
        tail = m.latency_ms
    else:
        tail = _flops_ms(tail_flops, d.server.gflops)
    send = transfer_ms(payload, d.link.uplink_mbps)
    latency = head_ms + encode + send + tail + d.link.rtt_ms
    acc = m.accuracy if m is not None else None
    violates = _violations(d.constraints, cost.head_flops_fraction, latency, payload, acc)
    return PlannedCut(
        module=point.module,
        candidate=candidate,
        cui_rank=rank,
        log10_cui=point.log10_cui,
        accuracy=acc,
        head_flops=head_flops,
        head_flops_fraction=cost.head_flops_fraction,
        head_params=cost.head_params,
        head_param_bytes=cost.head_param_bytes,
        head_peak_activation_bytes=cost.head_peak_activation_bytes,
        payload_bytes=payload,
        payload_source=source,
        head_ms=head_ms,
        head_source="measured" if timing is not None else "flops",
        encode_ms=encode,
        transfer_ms=send,
        tail_ms=tail,
        rtt_ms=d.link.rtt_ms,
        latency_ms=latency,
        feasible=not violates,
        violates=violates,
    )


def better_signal(a: PlannedCut, b: PlannedCut) -> int:
    """+1 when ``a``'s accuracy signal beats ``b``'s, -1 when worse, 0 when equal: measured
    accuracies when both are measured, else log10 CUI (the prediction)."""
    if a.accuracy is not None and b.accuracy is not None:
        x, y = a.accuracy, b.accuracy
    else:
        x, y = a.log10_cui, b.log10_cui
    return (x > y) - (x < y)


def dominates(a: PlannedCut, b: PlannedCut) -> bool:
    """``a`` is at least as good as ``b`` on accuracy signal, latency and payload, and better
    on one of them."""
    signal = better_signal(a, b)
    no_worse = signal >= 0 and a.latency_ms <= b.latency_ms and a.payload_bytes <= b.payload_bytes
    strictly = signal > 0 or a.latency_ms < b.latency_ms or a.payload_bytes < b.payload_bytes
    return no_worse and strictly


def pareto_front(cuts: Sequence[PlannedCut]) -> list[str]:
    """Names of the cuts no other cut dominates (identical cuts all stay), input order."""
    return [c.module for c in cuts if not any(dominates(o, c) for o in cuts if o is not c)]


def _binding(cuts: Sequence[PlannedCut], ranking: Sequence[str], recommended: str | None, d: Deployment) -> list[str]:
    by_name = {c.module: c for c in cuts}
    if recommended is not None:
        # What kept the better-ranked cuts out.
        above = ranking[: ranking.index(recommended)] if recommended in ranking else ranking
        return [k for k in CONSTRAINTS if any(k in by_name[n].violates for n in above if n in by_name)]
    if not cuts:
        return []
    fewest = min(len(c.violates) for c in cuts)
    return [k for k in CONSTRAINTS if any(k in c.violates for c in cuts if len(c.violates) == fewest)]


_UNITS = {
    "max_head_flops_fraction": ("head FLOPs fraction", lambda c: f"{c.head_flops_fraction:.3f}"),
    "max_latency_ms": ("latency", lambda c: f"{c.latency_ms:.1f} ms"),
    "max_payload_bytes": ("payload", lambda c: f"{c.payload_bytes} B"),
    "min_accuracy": ("measured accuracy", lambda c: f"{c.accuracy:.3f}"),
}


def _binding_detail(
    binding: list[str], cuts: Sequence[PlannedCut], order: Sequence[str], recommended: str | None, d: Deployment
) -> str:
    """One sentence: per binding constraint, its limit and the best-ranked cut it excludes."""
    if not binding:
        return "nothing: the best I-SPLIT cut satisfies every constraint"
    by_name = {c.module: c for c in cuts}
    parts = []
    for k in binding:
        what, show = _UNITS[k]
        excluded = next(by_name[n] for n in order if n in by_name and k in by_name[n].violates)
        parts.append(f"{k} = {getattr(d.constraints, k):g} (excludes `{excluded.module}`, {what} {show(excluded)})")
    head = "no cut satisfies every constraint; binding: " if recommended is None else "limited by: "
    return head + "; ".join(parts)


def make_plan(
    curve: ImportanceCurve,
    costs: CostProfile,
    deployment: Deployment,
    measured: Mapping[str, MeasuredCut] | None = None,
    *,
    accuracy_original: float | None = None,
) -> Plan:
    """Plan the analysis ``curve`` of a model with cost profile ``costs`` for ``deployment``.

    ``measured`` maps cut names to the trainer's measurements; ``accuracy_original`` (the
    unsplit model's accuracy) goes to the baselines.
    """
    measured = dict(measured or {})
    d = deployment
    device_measured = _measurement_applies(d.device.measured, costs)
    ranking = curve.ranking()
    rank = {name: i + 1 for i, name in enumerate(ranking)}
    isplit = {curve.best, *curve.candidates}
    cost_by = {c.module: c for c in costs.cuts}
    missing = [p.module for p in curve.points if p.module not in cost_by]
    if missing:
        raise IsplitError(f"the cost profile lacks cut {missing[0]!r}: it belongs to another model")
    cuts = [
        _plan_cut(p, cost_by[p.module], rank[p.module], p.module in isplit, measured.get(p.module), d, device_measured)
        for p in curve.points
        if not p.skipped
    ]
    by_name = {c.module: c for c in cuts}
    feasible = [c for c in cuts if c.feasible]

    def best_of(pool: list[PlannedCut]) -> PlannedCut | None:
        # Highest CUI; ties (equal CUI) go to the lower latency, then the smaller payload.
        return min(pool, key=lambda c: (-c.log10_cui, c.latency_ms, c.payload_bytes, c.cui_rank), default=None)

    pick = best_of([c for c in feasible if c.candidate])
    is_candidate = pick is not None
    if pick is None:
        pick = best_of(feasible)
    recommended = pick.module if pick else None
    order = sorted(isplit, key=lambda n: rank[n]) + [n for n in ranking if n not in isplit]
    binding = _binding(cuts, order, recommended, d)
    size_only = next((n for n in curve.size_ranking if n in by_name and by_name[n].feasible), None)
    measured_ok = [c for c in feasible if c.accuracy is not None]
    best_measured = max(measured_ok, key=lambda c: (c.accuracy, -c.cui_rank)).module if measured_ok else None
    notes = [
        f"device: {d.device.name} ({d.device.note or 'given'})",
        f"link: {d.link.name}, {d.link.uplink_mbps:g} Mbit/s up, {d.link.rtt_ms:g} ms round trip ({d.link.note or 'given'})",
        f"server: {d.server.name}, {d.server.gflops:g} GFLOP/s ({d.server.note or 'given'})",
        "latency = head + encode + transfer + tail + round trip, one image; payload: the raw tensor at the cut "
        f"({d.encoding}) unless the trainer measured the cut's bottleneck code",
    ]
    if d.device.measured is not None and not device_measured:
        notes.append("the device profile was measured on another model: only its effective GFLOP/s is used")
    if d.constraints.min_accuracy is not None:
        notes.append("min_accuracy excludes measured cuts only; unmeasured cuts have no accuracy yet")
    if recommended is not None and not is_candidate:
        notes.append("no I-SPLIT candidate is feasible: the recommendation is the feasible cut with the best CUI")
    return Plan(
        recommended=recommended,
        recommended_is_candidate=is_candidate,
        unconstrained=curve.best,
        size_only=size_only,
        best_measured=best_measured,
        pareto=pareto_front(cuts),
        binding=binding,
        binding_detail=_binding_detail(binding, cuts, order, recommended, d),
        baselines=_baselines(costs, d, accuracy_original),
        cuts=cuts,
        deployment=d,
        notes=notes,
    )


def _baselines(costs: CostProfile, d: Deployment, accuracy: float | None) -> dict[str, Baseline]:
    m = d.device.measured
    device_ms = m.total_ms if _measurement_applies(m, costs) else _flops_ms(costs.total_flops, d.device.gflops)
    server_ms = (
        d.link.rtt_ms
        + transfer_ms(costs.input_bytes, d.link.uplink_mbps)
        + _flops_ms(costs.total_flops, d.server.gflops)
    )
    c = d.constraints
    return {
        "all_on_device": Baseline(
            head_flops_fraction=1.0,
            payload_bytes=0,
            latency_ms=device_ms,
            accuracy=accuracy,
            feasible=not (v := _violations(c, 1.0, device_ms, 0, accuracy)),
            violates=v,
        ),
        "all_on_server": Baseline(
            head_flops_fraction=0.0,
            payload_bytes=costs.input_bytes,
            latency_ms=server_ms,
            accuracy=accuracy,
            feasible=not (v := _violations(c, 0.0, server_ms, costs.input_bytes, accuracy)),
            violates=v,
        ),
    }


def plan_table(plan: Plan) -> list[str]:
    """The plan as a Markdown table (one row per cut) with the verdict lines under it."""
    rows = [
        "| cut | I-SPLIT | CUI rank | accuracy | head FLOPs | payload B | head ms | transfer ms | tail ms | latency ms | feasible |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in plan.cuts:
        marks = ("**recommended** " if c.module == plan.recommended else "") + (
            "pareto" if c.module in plan.pareto else ""
        )
        rows.append(
            f"| {c.module} | {'cand' if c.candidate else ''} {marks.strip()} | {c.cui_rank} | "
            f"{'-' if c.accuracy is None else f'{100 * c.accuracy:.1f} %'} | {100 * c.head_flops_fraction:.1f} % | "
            f"{c.payload_bytes}{'*' if c.payload_source == 'bottleneck' else ''} | {c.head_ms:.2f} | "
            f"{c.transfer_ms:.2f} | {c.tail_ms:.2f} | {c.latency_ms:.1f} | "
            f"{'yes' if c.feasible else 'no: ' + ', '.join(c.violates)} |"
        )
    b = plan.baselines
    return rows + [
        "",
        "(* bottleneck code measured by the trainer; other payloads are the raw tensor at the cut)",
        "",
        f"* recommended: `{plan.recommended}`"
        + ("" if plan.recommended_is_candidate else " (not an I-SPLIT candidate)"),
        f"* unconstrained I-SPLIT best: `{plan.unconstrained}`; size-only choice under the same constraints: "
        f"`{plan.size_only}`",
        f"* binding: {plan.binding_detail}",
        f"* Pareto front (accuracy signal, latency, payload): {', '.join(f'`{n}`' for n in plan.pareto)}",
        f"* all on device: {b['all_on_device'].latency_ms:.1f} ms; all on server: {b['all_on_server'].latency_ms:.1f} ms "
        f"({b['all_on_server'].payload_bytes} B image)",
    ]


# -- measuring a device ---------------------------------------------------------------------


def _traced(module: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    # TorchScript, as the edge client runs an exported head.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), x, check_trace=False)


def measure_device(
    model: nn.Module,
    input_shape: Sequence[int],
    points: Sequence[CutPoint],
    *,
    arch: str = "",
    repeats: int = 20,
    bottleneck_ratio: int = 4,
    pause_s: float = 0.01,
) -> DeviceMeasurement:
    """Time, on this machine, the head at every non-skipped cut point, alone and followed by the
    bottleneck encoder of ``bottleneck_ratio``, and the whole model: one image, TorchScript (as
    the edge client runs an exported head), median of ``repeats``. Each timed call follows an
    idle pause of ``pause_s`` seconds, as an edge device's head call follows a wait on the
    network: a tight loop keeps caches and clocks warm and reports times several times lower
    than a device answering one request at a time. Also the fp16 encode rate."""
    if repeats < 1:
        raise IsplitError(f"repeats must be >= 1, got {repeats}")
    model = model.cpu().eval()
    x = torch.zeros(1, *input_shape)
    costs = cut_costs(model, input_shape, points)
    runs: dict[tuple[str, str], Callable[[], Any]] = {}
    largest = torch.zeros(0)
    with torch.inference_mode():
        runs[("", "model")] = _traced(model, x)
        for p in points:
            if p.skipped:
                continue
            head, _tail = split_at(model, p.module)
            runs[(p.module, "head")] = _traced(head, x)
            encoder = make_bottleneck(p.output_shape, bottleneck_ratio).encoder
            runs[(p.module, "bottleneck")] = _traced(nn.Sequential(head, encoder), x)
            code = runs[(p.module, "head")](x)
            largest = code if code.numel() > largest.numel() else largest
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn(x)  # warm-up: first calls allocate and optimise the graph
            fn(x)
        for _ in range(repeats):
            for key, fn in runs.items():
                time.sleep(pause_s)
                t0 = time.perf_counter()
                fn(x)
                times[key].append(1e3 * (time.perf_counter() - t0))
        # The rate on the largest code, where bytes (not the per-call overhead) dominate.
        encode_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            wire.encode(largest, "fp16")
            encode_s.append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) for k, v in times.items()}
    timings = {
        p.module: CutTiming(head_ms=ms[(p.module, "head")], bottleneck_head_ms=ms[(p.module, "bottleneck")])
        for p in points
        if not p.skipped
    }
    total_ms = ms[("", "model")]
    return DeviceMeasurement(
        host=platform.node(),
        machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        torch_threads=torch.get_num_threads(),
        arch=arch,
        input_shape=list(input_shape),
        total_flops=costs.total_flops,
        total_ms=total_ms,
        gflops=costs.total_flops / (total_ms * 1e6),
        encode_mb_per_s=4 * largest.numel() / max(statistics.median(encode_s), 1e-9) / 1e6,
        repeats=repeats,
        bottleneck_ratio=bottleneck_ratio,
        pause_ms=1e3 * pause_s,
        cuts=timings,
    )


# -- reading an analysis directory ----------------------------------------------------------


def load_measured(path: Path, *, subset: bool) -> dict[str, MeasuredCut]:
    """``measured.json`` of an analysis directory (a list of ``TrainingResult`` dicts) or {}."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IsplitError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, list):
        raise IsplitError(f"{path} must hold a list of training results, got {type(data).__name__}")
    return measured_from_results(data, subset=subset)


def plan_analysis(result: Any, deployment: Deployment, measured: Mapping[str, MeasuredCut] | None = None) -> Plan:
    """Plan an ``AnalysisResult`` (``result.json``); ``IsplitError`` if it has no cost profile."""
    if result.costs is None:
        raise IsplitError("this analysis has no cost profile (it predates `isplit plan`); run `isplit analyze` again")
    return make_plan(result.curve, result.costs, deployment, measured, accuracy_original=result.model.test_accuracy)


def spec_from_args(args: argparse.Namespace) -> DeploymentSpec:
    """The deployment the ``isplit plan`` flags describe (validated; ``IsplitError`` if bad)."""
    fields = {
        "device": args.device,
        "device_gflops": args.device_gflops,
        "link": args.link,
        "uplink_mbps": args.uplink_mbps,
        "rtt_ms": args.rtt_ms,
        "server": args.server,
        "server_gflops": args.server_gflops,
        "encoding": args.encoding,
        "max_head_flops_fraction": args.max_head_flops_fraction,
        "max_latency_ms": args.max_latency_ms,
        "max_payload_bytes": args.max_payload_bytes,
        "min_accuracy": args.min_accuracy,
    }
    if args.device_profile:
        fields["device_profile"] = load_device_measurement(Path(args.device_profile))
    if args.use_registration_latency:
        fields["use_registration_latency"] = True
    return parse_deployment_spec({k: v for k, v in fields.items() if v is not None}, where="plan")


def _cmd_plan(args: argparse.Namespace) -> int:
    from isplit.analysis import load_result

    folder = Path(args.analysis)
    result = load_result(folder)
    spec = spec_from_args(args)
    measured = load_measured(folder / "measured.json", subset=result.classes is not None)
    plan = plan_analysis(result, resolve_deployment(spec), measured)
    if args.json:
        print(plan.model_dump_json())
        return 0
    print(f"{result.model.arch} on {result.dataset}, classes {result.classes or 'all'}")
    print("\n".join(plan.notes))
    print()
    print("\n".join(plan_table(plan)))
    return 0


def add_deployment_flags(p: argparse.ArgumentParser) -> None:
    """The deployment flags ``isplit plan`` takes (and the API's plan query mirrors)."""
    g = p.add_argument_group("deployment (presets are assumptions, not measurements)")
    dev = g.add_mutually_exclusive_group()
    dev.add_argument("--device", metavar="PRESET", help=_presets(DEVICE_PRESETS) + " (default rpi4)")
    dev.add_argument("--device-gflops", type=float, metavar="F", help="effective GFLOP/s of the edge device")
    dev.add_argument("--device-profile", metavar="FILE", help="a profile from `isplit edge profile`")
    g.add_argument("--link", metavar="PRESET", help=_presets(LINK_PRESETS) + " (default lte)")
    g.add_argument("--uplink-mbps", type=float, metavar="B", help="uplink Mbit/s (overrides the link preset)")
    g.add_argument("--rtt-ms", type=float, metavar="R", help="round trip ms (overrides the link preset)")
    g.add_argument("--server", metavar="PRESET", help=_presets(SERVER_PRESETS) + " (default gpu)")
    g.add_argument("--server-gflops", type=float, metavar="F", help="effective GFLOP/s of the tail server")
    g.add_argument(
        "--use-registration-latency",
        action="store_true",
        help="tail time of a retrained cut = the latency TorchServe measured at registration",
    )
    g.add_argument("--encoding", choices=ENCODINGS, help="wire encoding of the code (default fp16)")
    c = p.add_argument_group("constraints")
    c.add_argument("--max-head-flops-fraction", type=float, metavar="X", help="head FLOPs / network FLOPs, (0, 1]")
    c.add_argument("--max-latency-ms", type=float, metavar="L", help="end-to-end latency per image")
    c.add_argument("--max-payload-bytes", type=int, metavar="N", help="bytes per image on the wire")
    c.add_argument("--min-accuracy", type=float, metavar="A", help="measured accuracy in [0, 1]")


def _presets(presets: Mapping[str, BaseModel]) -> str:
    return "; ".join(f"{k}: {v.note}" for k, v in presets.items())  # type: ignore[attr-defined]


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="recommend a cut for a deployment (device, link, server, constraints)",
        description="Estimate per-cut latency, payload and head cost for a deployment and recommend the best "
        "I-SPLIT candidate that satisfies the constraints. Presets are assumptions, not measurements.",
    )
    p.add_argument("--analysis", required=True, metavar="DIR", help="an `isplit analyze` output (result.json)")
    add_deployment_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)
