"""Side by side, per tail: the handler in-process, the bare FastAPI endpoint, and TorchServe
without server-side batching (batch 1) and with it (batch ``--batch-size`` at each delay of
``--batch-delays``), at each ``--concurrency``, taken in turn for ``--rounds`` rounds."""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from isplit import torchserve as ts
from isplit import wire

from .load import load_test, measure
from .results import LoadResult, log
from .servers import Server, fastapi_endpoint, load_handler, measure_batched, private_torchserve, serve, time_in_process

BARE = "fastapi (bare)"
UNBATCHED = "torchserve, no batching"


@dataclass
class TailCase:
    """One tail to serve: its exported pair directory (``tail.pt``, ``tail.json``), its ``.mar``,
    single-image fp16 wire messages, and the timed requests per cell (scaled up with concurrency)
    and warm-up requests per endpoint."""

    label: str
    name: str
    model_dir: Path
    mar: Path
    payloads: list[bytes]
    requests: int
    warmup: int


def requests_at(requests: int, concurrency: int) -> int:
    """Timed requests for one cell: ``requests``, times concurrency / 8 from 16 clients up (every
    client thread sends several)."""
    return requests * max(1, concurrency // 8)


def alternating_rounds(
    server: Server | None, endpoints: Sequence[tuple], concurrency: Sequence[int], requests: int, rounds: int
) -> dict[str, dict[str, dict]]:
    """fp16 single-image requests on each endpoint in turn at each concurrency, ``rounds`` times;
    per endpoint and concurrency (as a string) the medians over rounds of p50, p95 (ms),
    throughput (req/s) and the mean server-side batch, so that a change of load on the machine
    hits every endpoint alike. ``endpoints`` holds ``(label, TorchServe model name or None, URL,
    payloads)``."""
    cells: dict[str, dict[str, list[LoadResult]]] = {
        label: {str(c): [] for c in concurrency} for label, *_ in endpoints
    }
    for _ in range(rounds):
        for label, name, url, items in endpoints:
            for c in concurrency:
                n = requests_at(requests, c)
                result = (
                    measure(label, url, "fp16", items, c, n)
                    if name is None
                    else measure_batched(label, server, name, url, "fp16", items, c, n)
                )
                cells[label][str(c)].append(result)
    out: dict[str, dict[str, dict]] = {}
    for label, by_c in cells.items():
        out[label] = {}
        for c, results in by_c.items():
            batches = [r.mean_batch for r in results if r.mean_batch is not None]
            out[label][c] = {
                "p50_ms": statistics.median(r.p50_ms for r in results),
                "p95_ms": statistics.median(r.p95_ms for r in results),
                "rps": statistics.median(r.throughput_rps for r in results),
                "mean_batch": statistics.median(batches) if batches else None,
                "errors": sum(r.errors for r in results),
            }
    return out


def side_by_side(cases: Sequence[TailCase], args: argparse.Namespace) -> list[dict]:
    """:func:`compare_servers` for every case on one private TorchServe (each case's models
    registered only while it is measured)."""
    with private_torchserve({}, {}) as server:
        return [compare_servers(server, case, args) for case in cases]


def compare_servers(server: Server, case: TailCase, args: argparse.Namespace) -> dict:
    """The tail's own cost, the in-process handler, and every server at every concurrency."""
    concurrency = [int(c) for c in args.concurrency.split(",")]
    delays = [int(d) for d in args.batch_delays.split(",")]
    code = wire.decode(case.payloads[0])
    tail = torch.jit.load(str(case.model_dir / "tail.pt")).eval()
    batch = code.repeat(args.batch_size, *([1] * (code.dim() - 1)))
    row: dict = {
        "tail": case.label,
        "code_shape": list(code.shape[1:]),
        "bytes_per_request": len(case.payloads[0]),
        "tail_ms_per_image": ts.tail_cost_ms(tail, code),
        f"tail_ms_per_image_at_batch_{args.batch_size}": ts.tail_cost_ms(tail, batch),
        "requests": case.requests,
        "rounds": args.rounds,
    }
    handler, context = load_handler(case.model_dir, case.name)
    row["in_process"] = time_in_process(handler, context, case.payloads[0], max(50, case.requests))
    del handler
    registrations = [(UNBATCHED, 1, 0)] + [
        (f"torchserve, batch {args.batch_size}, delay {d} ms", args.batch_size, d) for d in delays
    ]
    row["registrations"] = {label: {"batch_size": b, "max_batch_delay_ms": d, "workers": args.workers}
                            for label, b, d in registrations}  # fmt: skip
    with fastapi_endpoint(case.model_dir, f"fastapi-{case.name}") as bare_url:
        endpoints = [(BARE, None, bare_url, case.payloads)]
        for i, (label, b, d) in enumerate(registrations):
            name = f"{case.name}-{i}-{os.getpid()}"
            url = serve(server, case.mar, name, batch_size=b, delay_ms=d, workers=args.workers)
            endpoints.append((label, name, url, case.payloads))
        try:
            log(f"side by side, {case.label}: warming up {len(endpoints)} endpoints ({case.warmup} requests each) ...")
            for _label, _name, url, items in endpoints:
                load_test(url, items, 16, 0, warmup=case.warmup)
            log(f"side by side, {case.label}: {args.rounds} rounds at concurrency {args.concurrency} ...")
            row["servers"] = alternating_rounds(server, endpoints, concurrency, case.requests, args.rounds)
        finally:
            for _label, name, _url, _items in endpoints[1:]:
                ts.unregister(server.management_url, name)
                (server.model_store / f"{name}.mar").unlink(missing_ok=True)
    return row
