"""``isplit plan``: plan an ``isplit analyze`` output for a deployment given as flags."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

from isplit.plan.costs import ENCODINGS, load_measured
from isplit.plan.planner import plan_analysis
from isplit.plan.profiles import (
    DEVICE_PRESETS,
    LINK_PRESETS,
    SERVER_PRESETS,
    DeploymentSpec,
    load_device_measurement,
    parse_deployment_spec,
    resolve_deployment,
)
from isplit.plan.report import plan_table


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
