"""The servers under test: a private TorchServe (``isplit.dev.torchserve``), a bare FastAPI
endpoint around the same handler, and the handler called in-process."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response

from isplit import torchserve as ts
from isplit import wire
from isplit.dev.torchserve import TorchServeEndpoints, free_ports, temporary_torchserve

from .load import load_test, measure, percentile
from .results import HANDLER, REPO, THREADS_ENV, TOP_K, LoadResult

# A TorchServe the benchmark starts (``private_torchserve``) or is given (``--inference-url``...).
Server = TorchServeEndpoints


@contextmanager
def private_torchserve(overrides: dict[str, str | None], env: dict[str, str]) -> Iterator[Server]:
    """A TorchServe of our own (``scripts/torchserve`` on free ports), removed afterwards.

    Its token authorization is off: a throw-away server on the loopback address, and the load
    generators measure the model server, not the key check."""
    overrides = {"disable_token_authorization": "true", **overrides}
    with temporary_torchserve("isplit-bench-", overrides, env) as server:
        yield server


def serve(server: Server, mar: Path, name: str, *, batch_size: int, delay_ms: int, workers: int) -> str:
    """Copy ``mar`` into the server's store as ``<name>.mar``, register it; its predictions URL."""
    target = server.model_store / f"{name}.mar"
    if mar.resolve() != target.resolve():
        shutil.copyfile(mar, target)
    ts.register(server.management_url, target.name, name, batch_size=batch_size, max_batch_delay_ms=delay_ms,
                initial_workers=workers)  # fmt: skip
    return ts.inference_url(server.inference_url, name)


def batch_totals(server: Server, name: str) -> tuple[float, float]:
    """(forward passes, codes) of model ``name`` so far, from the handler's
    ``isplit_tail_batch_size`` histogram; (0, 0) without a metrics URL."""
    if server.metrics_url is None:
        return 0.0, 0.0
    with urllib.request.urlopen(f"{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = []
    for suffix in ("count", "sum"):
        pattern = rf'^isplit_tail_batch_size_{suffix}\{{[^}}]*ModelName="{re.escape(name)}"[^}}]*\}} (\S+)$'
        totals.append(sum(float(v) for v in re.findall(pattern, text, re.MULTILINE)))
    return totals[0], totals[1]


def measure_batched(
    endpoint: str,
    server: Server,
    name: str,
    url: str,
    encoding: str,
    payloads: Sequence[bytes],
    concurrency: int,
    requests: int,
) -> LoadResult:
    """:func:`measure` on a TorchServe model, plus its mean server-side batch size (from the
    handler's ``isplit_tail_batch_size`` metric) over the timed requests."""
    load_test(url, payloads, concurrency, 0, warmup=100)
    before = batch_totals(server, name)
    result = measure(endpoint, url, encoding, payloads, concurrency, requests, warmup=0)
    deadline = time.monotonic() + 10  # backend metrics reach :8082 a moment after the answers
    while True:
        after = batch_totals(server, name)
        if after[1] - before[1] >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    passes = after[0] - before[0]
    result.mean_batch = (after[1] - before[1]) / passes if passes else None
    return result


# -- the bare FastAPI endpoint and the in-process handler ---------------------------------


class StubContext:
    """The part of TorchServe's ``Context`` the tail handler uses, for a one-request batch."""

    def __init__(self, model_dir: Path, name: str) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_name = name
        self.metrics = None
        self.status: int | None = None
        self.top_k = str(TOP_K)

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return {wire.TOP_K_HEADER: self.top_k}

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str = "", idx: int = 0) -> None:
        self.status = code


def load_handler(model_dir: Path, name: str):
    """The project's TorchServe handler, initialised on ``model_dir`` with a stub context."""
    spec = importlib.util.spec_from_file_location("isplit_tail_handler", HANDLER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler, context = module.TailHandler(), StubContext(model_dir, name)
    handler.initialize(context)
    return handler, context


def run_fastapi(model_dir: Path, port: int) -> None:
    """The bare endpoint: the same handler behind one FastAPI route, no batching, no metrics."""
    handler, context = load_handler(model_dir, "fastapi")
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"status": "Healthy"}

    @app.post("/predictions/{name}")
    async def predict(name: str, request: Request) -> Response:
        context.status, context.top_k = None, request.headers.get(wire.TOP_K_HEADER, "5")
        [body] = handler.handle([{"body": await request.body()}], context)
        return Response(body, status_code=context.status or 200, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def fastapi_endpoint(model_dir: Path, name: str) -> Iterator[str]:
    """The bare endpoint for the model in ``model_dir`` (own process); its predictions URL."""
    [port] = free_ports(1)
    command = [sys.executable, "-m", "benchmarks.serving", "--serve-fastapi", str(model_dir), "--port", str(port)]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errors, env={**os.environ, THREADS_ENV: "1"})  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not ts.is_healthy(f"http://127.0.0.1:{port}", timeout_s=1):
                if proc.poll() is not None or time.monotonic() > deadline:
                    errors.seek(0)
                    raise RuntimeError(f"the FastAPI endpoint did not start: {errors.read().decode()[-2000:]}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/predictions/{name}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def time_in_process(handler, context, payload: bytes, n: int) -> dict:
    """Median and p95 of ``handler.handle`` on one request (decode, tail, top-k, JSON), ms."""
    for _ in range(50):
        handler.handle([{"body": payload}], context)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        handler.handle([{"body": payload}], context)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95)}
