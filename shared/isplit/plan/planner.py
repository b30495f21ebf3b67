"""The planner: per cut, estimated end-to-end latency ``head + encode + transfer + tail + rtt``
beside the accuracy signal and the payload; the recommended cut, the Pareto front, the
baselines, the size-only choice and the binding constraint. Pure arithmetic on the models of
:mod:`isplit.plan.costs` and :mod:`isplit.plan.profiles`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from isplit import IsplitError, wire
from isplit.importance import CutScore, ImportanceCurve
from isplit.plan.costs import CostProfile, CutCost, MeasuredCut
from isplit.plan.profiles import CONSTRAINTS, Constraints, Deployment, DeviceMeasurement


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


def plan_analysis(result: Any, deployment: Deployment, measured: Mapping[str, MeasuredCut] | None = None) -> Plan:
    """Plan an ``AnalysisResult`` (``result.json``); ``IsplitError`` if it has no cost profile."""
    if result.costs is None:
        raise IsplitError("this analysis has no cost profile (it predates `isplit plan`); run `isplit analyze` again")
    return make_plan(result.curve, result.costs, deployment, measured, accuracy_original=result.model.test_accuracy)
