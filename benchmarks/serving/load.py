"""Load generation: single-image requests over keep-alive connections at a concurrency, and
the latency and throughput they measured."""

from __future__ import annotations

import http.client
import itertools
import json
import statistics
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from isplit import wire

from .results import HEADERS, LoadResult


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def load_test(url: str, payloads: Sequence[bytes], concurrency: int, requests: int, warmup: int = 100) -> dict:
    """POST single-image ``payloads`` (cycled) from ``concurrency`` threads, one keep-alive
    connection each; returns latencies (ms), wall seconds and the count of non-200 answers."""
    parts = urlsplit(url)
    latencies: list[float] = []
    errors = [0]

    def run(count: int) -> float:
        counter = itertools.count()

        def worker() -> None:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            mine: list[float] = []
            try:
                while (i := next(counter)) < count:
                    body = payloads[i % len(payloads)]
                    t0 = time.perf_counter()
                    conn.request("POST", parts.path, body=body, headers=HEADERS)
                    response = conn.getresponse()
                    response.read()
                    mine.append((time.perf_counter() - t0) * 1e3)
                    if response.status != 200:
                        errors[0] += 1
            finally:
                conn.close()
                latencies.extend(mine)

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    run(warmup)
    latencies.clear()
    errors[0] = 0
    wall = run(requests)
    return {"latencies": latencies, "wall_s": wall, "errors": errors[0]}


def measure(
    endpoint: str,
    url: str,
    encoding: str,
    payloads: Sequence[bytes],
    concurrency: int,
    requests: int,
    warmup: int = 100,
) -> LoadResult:
    out = load_test(url, payloads, concurrency, requests, warmup)
    lat = out["latencies"]
    return LoadResult(
        endpoint=endpoint,
        encoding=encoding,
        concurrency=concurrency,
        requests=requests,
        p50_ms=percentile(lat, 50),
        p95_ms=percentile(lat, 95),
        mean_ms=statistics.fmean(lat),
        throughput_rps=requests / out["wall_s"],
        bytes_per_request=statistics.fmean(len(p) for p in payloads),
        errors=out["errors"],
    )


def served_top1(url: str, tensors: torch.Tensor, encoding: str, chunk: int = 250) -> torch.Tensor:
    """Top-1 classes ``(N,)`` of a served model for ``tensors`` ``(N, ...)``, sent in batched requests."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    out: list[int] = []
    try:
        for start in range(0, len(tensors), chunk):
            conn.request("POST", parts.path, body=wire.encode(tensors[start : start + chunk], encoding),
                         headers={**HEADERS, wire.TOP_K_HEADER: "1"})  # fmt: skip
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"{url} answered {response.status}: {body[:300]!r}")
            out += [p[0]["class"] for p in json.loads(body)["predictions"]]
    finally:
        conn.close()
    return torch.tensor(out)
