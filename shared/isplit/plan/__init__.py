"""Deployment planning: which cut a real edge/link/server deployment can use.

I-SPLIT's importance curve says how well a cut will do; it says nothing about the device that
must run the head, the link that carries the code or the server that runs the tail. This
package joins the two:

* ``costs``: the **cost profile** per cut point (:func:`cut_costs`, computed by every
  analysis): head and tail FLOPs, head parameters, peak head activation memory, raw payload at
  the cut; and what the trainer measured for a retrained cut (:class:`MeasuredCut`);
* ``profiles``: the **deployment** (:class:`Deployment`): the edge device (effective GFLOP/s,
  or a profile measured by ``isplit edge profile``), the link (uplink Mbit/s, round trip), the
  server (effective GFLOP/s, or the tail latency TorchServe measured at registration) and the
  constraints (``max_head_flops_fraction``, ``max_latency_ms``, ``max_payload_bytes``,
  ``min_accuracy``); named presets are documented *assumptions*, not measurements;
* ``planner``: the **plan** (:func:`make_plan`): per cut, estimated end-to-end latency
  ``head + encode + transfer + tail + rtt`` beside the accuracy signal and the payload; the
  recommended cut (the best I-SPLIT candidate that satisfies the constraints), the Pareto
  front, the all-on-device and all-on-server baselines, the size-only choice under the same
  constraints and, when a constraint limits the choice, which one binds;
* ``measure``: timing this machine as an edge device (:func:`measure_device`);
* ``report``: the plan as a Markdown table (:func:`plan_table`); ``cli``: ``isplit plan``.

The planner is pure arithmetic on these models; measuring and file I/O
(:func:`load_device_measurement`, :func:`load_measured`) are kept apart. Every public name is
importable from ``isplit.plan``.
"""

from isplit.plan.cli import add_deployment_flags, register_cli, spec_from_args
from isplit.plan.costs import (
    ENCODINGS,
    CostProfile,
    CutCost,
    Encoding,
    MeasuredCut,
    cut_costs,
    layer_flops,
    load_measured,
    measured_from_results,
)
from isplit.plan.measure import measure_device
from isplit.plan.planner import (
    Baseline,
    Plan,
    PlannedCut,
    better_signal,
    dominates,
    make_plan,
    pareto_front,
    plan_analysis,
    transfer_ms,
)
from isplit.plan.profiles import (
    CONSTRAINTS,
    DEFAULT_DEPLOYMENT,
    DEMO_DEPLOYMENT,
    DEVICE_PRESETS,
    LINK_PRESETS,
    MEASUREMENT_FORMAT,
    SERVER_PRESETS,
    Constraints,
    CutTiming,
    Deployment,
    DeploymentSpec,
    DeviceMeasurement,
    DeviceProfile,
    LinkProfile,
    ServerProfile,
    load_device_measurement,
    parse_deployment_spec,
    resolve_deployment,
)
from isplit.plan.report import plan_table

__all__ = [
    "CONSTRAINTS",
    "DEFAULT_DEPLOYMENT",
    "DEMO_DEPLOYMENT",
    "DEVICE_PRESETS",
    "ENCODINGS",
    "LINK_PRESETS",
    "MEASUREMENT_FORMAT",
    "SERVER_PRESETS",
    "Baseline",
    "Constraints",
    "CostProfile",
    "CutCost",
    "CutTiming",
    "Deployment",
    "DeploymentSpec",
    "DeviceMeasurement",
    "DeviceProfile",
    "Encoding",
    "LinkProfile",
    "MeasuredCut",
    "Plan",
    "PlannedCut",
    "ServerProfile",
    "add_deployment_flags",
    "better_signal",
    "cut_costs",
    "dominates",
    "layer_flops",
    "load_device_measurement",
    "load_measured",
    "make_plan",
    "measure_device",
    "measured_from_results",
    "parse_deployment_spec",
    "pareto_front",
    "plan_analysis",
    "plan_table",
    "register_cli",
    "resolve_deployment",
    "spec_from_args",
    "transfer_ms",
]
