"""What the serving benchmark measures: constants shared by its modules and the report's records."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from isplit import wire

REPO = Path(__file__).resolve().parents[2]
HANDLER = REPO / "services" / "tail-serving" / "isplit_tail_handler.py"
TOP_K = 3
HEADERS = {"Content-Type": "application/octet-stream", wire.TOP_K_HEADER: str(TOP_K)}
ENCODINGS = ("fp32", "fp16", "int8")
# The handler reads this (intra-op threads per worker; 0 = torch's default, one per core).
THREADS_ENV = "ISPLIT_TAIL_TORCH_THREADS"
# Performance settings config.properties may add to TorchServe's defaults; the "stock" tuning
# variant removes them (of these, the project config sets async_logging).
TUNING_KEYS = ("async_logging", "disable_system_metrics", "number_of_netty_threads", "netty_client_threads", "vmargs")


@dataclass
class LoadResult:
    """One latency/throughput cell: ``requests`` single-image requests at ``concurrency``."""

    endpoint: str
    encoding: str
    concurrency: int
    requests: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    throughput_rps: float
    bytes_per_request: float
    errors: int
    mean_batch: float | None = None  # TorchServe: codes per forward pass, from the handler's metric


@dataclass
class Report:
    machine: dict
    model: dict
    edge: dict = field(default_factory=dict)
    payload: dict = field(default_factory=dict)
    agreement: dict = field(default_factory=dict)
    latency: list[LoadResult] = field(default_factory=list)
    in_process: dict = field(default_factory=dict)
    head_to_head: dict = field(default_factory=dict)
    tuning: list[dict] = field(default_factory=list)
    side_by_side: list[dict] = field(default_factory=list)  # per tail: see side_by_side.compare_servers
    goals: dict = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_ms(fn: Callable[[], object], n: int = 200) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
