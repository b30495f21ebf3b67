"""Benchmark split serving: a tail on a real TorchServe against offloading the whole image.

One run does everything on one machine:

1. trains (or loads: ``--checkpoint``, or the copy cached in ``--work-dir``) a narrow VGG11 on
   Fashion-MNIST at 32 px, inserts a bottleneck at ``--cut`` and retrains it, exports the
   head/tail pair and archives two models with the project's handler: the tail, and a
   *full-image* endpoint (the whole model, preprocessing included, as a "tail" whose code is
   the raw 28x28 image, sent as fp16, exact for 0..255);
2. starts its own TorchServe (``scripts/torchserve``, temporary artifact root and run dir,
   free ports, the project's ``services/tail-serving/config.properties``), or reuses one given
   by ``--inference-url``/``--management-url``/``--model-store``; registers the tail twice
   (``--max-batch-delay-ms``, default 0, and ``--batched-delay-ms``, default 1) and the
   full-image model; serves the same two models from bare FastAPI endpoints (uvicorn, one
   process each, the same handler class, no batching);
3. sends the 10,000 test images through the served tail (batched requests) per encoding and
   through the full-image endpoint; reports agreement with the full model run locally;
4. after ``--warmup`` requests per endpoint (the JVM compiles TorchServe's request path as it
   goes), measures single-image requests at each ``--concurrency`` (one keep-alive HTTP/1.1
   connection per client thread): p50/p95 latency, throughput, bytes per request and the mean
   server-side batch; the handler called in-process (no HTTP) gives the floor;
5. head to head: TorchServe (both registrations) and the bare endpoint taken in turn for
   ``--rounds`` rounds, medians reported, and the goals checked on them;
6. unless ``--no-tuning``: the tuning experiments (stock TorchServe and torch threads, the
   project config, batch size and delay, workers, a quiet log4j2), also in alternating rounds.

Prints tables and writes JSON (``--json-out``). Exits 1 when a request failed. Everything
shares the machine with the client: on a shared 2-core box, run it without ``nice`` (a
niced TorchServe, three processes per request, suffers more than a one-process endpoint)
and at a quiet moment; the JSON records the load average before and after.

    .venv/bin/python benchmarks/bench_serving.py --json-out var/bench-serving.json
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, Request, Response
from PIL import Image
from torch import nn

from isplit import torchserve as ts
from isplit import wire
from isplit.checkpoint import ModelInfo, load_model, save_checkpoint
from isplit.data import ImageSet, load_dataset, to_model_input
from isplit.export import export_pair
from isplit.messages import BottleneckSpec
from isplit.retrain import retrain_split
from isplit.training import evaluate, train_classifier
from isplit.zoo import build_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "torchserve"
CONFIG = REPO / "services" / "tail-serving" / "config.properties"
HANDLER = REPO / "services" / "tail-serving" / "isplit_tail_handler.py"
TOP_K = 3
HEADERS = {"Content-Type": "application/octet-stream", "X-Isplit-Top-K": str(TOP_K)}
ENCODINGS = ("fp32", "fp16", "int8")
# The handler reads this (intra-op threads per worker; 0 = torch's default, one per core).
THREADS_ENV = "ISPLIT_TAIL_TORCH_THREADS"
# Performance settings config.properties may add to TorchServe's defaults; the "stock" tuning
# variant removes them (of these, the project config sets async_logging).
TUNING_KEYS = ("async_logging", "disable_system_metrics", "number_of_netty_threads", "netty_client_threads", "vmargs")


# -- results ------------------------------------------------------------------------------


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
    goals: dict = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a Fashion-MNIST isplit checkpoint (else one is trained)")
    p.add_argument("--work-dir", type=Path, default=REPO / "var" / "bench-serving", help="cached model, exports")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=4, help="reference model training epochs")
    p.add_argument("--train-images", type=int, default=60000, help="for the reference model and the bottleneck")
    p.add_argument("--cut", default="features.20")
    p.add_argument("--ratio", type=int, default=1, help="bottleneck channel reduction at the cut")
    p.add_argument("--bottleneck-epochs", type=int, default=4)
    p.add_argument("--requests", type=int, default=600, help="timed requests per latency cell")
    p.add_argument("--warmup", type=int, default=2000, help="untimed requests per endpoint first (JVM warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the head-to-head comparison")
    p.add_argument("--concurrency", default="1,8,16", help="client threads, comma-separated")
    p.add_argument("--batch-size", type=int, default=16, help="TorchServe server-side batch size")
    p.add_argument("--max-batch-delay-ms", type=int, default=0, help="for the tail and the full-image endpoint")
    p.add_argument("--batched-delay-ms", type=int, default=1, help="for a second registration of the tail")
    p.add_argument("--workers", type=int, default=2, help="TorchServe workers per registered model")
    p.add_argument("--no-tuning", action="store_true", help="skip the tuning experiments")
    p.add_argument("--inference-url", help="reuse this TorchServe (with --management-url, --model-store)")
    p.add_argument("--management-url")
    p.add_argument("--model-store", type=Path)
    p.add_argument("--metrics-url", help="with --inference-url: its metrics API, for the mean batch sizes")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--serve-fastapi", type=Path, help=argparse.SUPPRESS)  # internal: the bare endpoint
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inference_url and not (args.management_url and args.model_store):
        p.error("--inference-url needs --management-url and --model-store")
    return args


# -- the model and the pair ---------------------------------------------------------------


def reference_model(args: argparse.Namespace, train: ImageSet, test: ImageSet) -> tuple[nn.Module, ModelInfo, Path]:
    """The checkpoint given, else a cached or freshly trained VGG11 (``--width``) at 32 px."""
    path = args.checkpoint
    if path is None:
        path = args.work_dir / f"vgg11-w{args.width}-fmnist-e{args.epochs}-n{args.train_images}.pt"
        if not path.is_file():
            log(f"training the reference model ({args.epochs} epochs on {args.train_images} images) ...")
            subset = train.subset(None, args.train_images)
            mean, std = subset.channel_stats()
            model = build_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=args.width)
            train_classifier(model, subset, input_size=32, mean=mean, std=std, epochs=args.epochs,
                             lr=2e-3, device=torch.device("cpu"), progress=False)  # fmt: skip
            info = ModelInfo(arch="vgg11", num_classes=10, in_channels=1, input_size=32, width=args.width,
                             class_names=train.class_names, mean=mean, std=std, dataset="fashion-mnist",
                             epochs=args.epochs)  # fmt: skip
            info.test_accuracy = evaluate(model.eval(), test.batches(256, input_size=32, mean=mean, std=std), "cpu")
            save_checkpoint(path, model, info)
    model, info = load_model(path)
    return model, info, path


class FullImageModel(nn.Module):
    """The whole model behind a "tail" interface: raw pixels ``(N, C, H, W)`` float32 in [0, 255]
    (native size) -> logits. Preprocessing is :func:`isplit.data.to_model_input`'s, in the graph."""

    def __init__(self, model: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.model, self.size = model, info.input_size
        self.register_buffer("mean", torch.tensor(info.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels / 255.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.model((x - self.mean) / self.std)


def export_full_image(model: nn.Module, info: ModelInfo, image_shape: Sequence[int], out: Path, name: str) -> Path:
    """``tail.pt`` + ``tail.json`` of :class:`FullImageModel`; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    full = FullImageModel(model, info).eval()
    example = torch.zeros(1, *image_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(full, example, check_trace=False)
        torch.jit.save(traced, str(out / "tail.pt"))
    meta = {"schema_version": 1, "model_name": name, "analysis_id": "bench", "candidate_id": "full-image",
            "cut": "input", "code_shape": list(image_shape), "class_names": info.class_names}  # fmt: skip
    (out / "tail.json").write_text(json.dumps(meta))
    return out


# -- TorchServe -----------------------------------------------------------------------------


@dataclass
class Server:
    inference_url: str
    management_url: str
    model_store: Path
    metrics_url: str | None = None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def server_config(overrides: dict[str, str | None]) -> str:
    """The project's config.properties with ``overrides`` applied (``None`` removes a key) and
    every port moved to a free one."""
    ports = free_ports(5)
    overrides = {
        "inference_address": f"http://127.0.0.1:{ports[0]}",
        "management_address": f"http://127.0.0.1:{ports[1]}",
        "metrics_address": f"http://127.0.0.1:{ports[2]}",
        "grpc_inference_port": str(ports[3]),
        "grpc_management_port": str(ports[4]),
        **overrides,
    }
    text = CONFIG.read_text()
    for key, value in overrides.items():
        line = "" if value is None else f"{key}={value}"
        text, found = re.subn(rf"^{re.escape(key)}=.*$", line, text, flags=re.MULTILINE)
        if not found and value is not None:
            text += f"\n{line}\n"
    return text


@contextmanager
def private_torchserve(overrides: dict[str, str | None], env: dict[str, str]) -> Iterator[Server]:
    """A TorchServe of our own (``scripts/torchserve``), stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="isplit-bench-"))
    run_env = {**os.environ, **env, "ISPLIT_ARTIFACT_ROOT": str(root / "a"), "ISPLIT_TORCHSERVE_DIR": str(root / "r"),
               "ISPLIT_TORCHSERVE_CONFIG": str(root / "config.properties")}  # fmt: skip

    def script(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), command], env=run_env, cwd=REPO, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=240, check=False)  # fmt: skip

    try:
        for _attempt in range(3):  # a free port can be taken before TorchServe binds it
            (root / "config.properties").write_text(server_config(overrides))
            done = script("start")
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"scripts/torchserve start failed:\n{done.stdout}\n{done.stderr}")
        state = dict(
            line.split("=", 1) for line in (root / "r" / "torchserve.env").read_text().splitlines() if "=" in line
        )
        yield Server(state["ISPLIT_TORCHSERVE_INFERENCE_URL"], state["ISPLIT_TORCHSERVE_MANAGEMENT_URL"],
                     Path(state["ISPLIT_TORCHSERVE_MODEL_STORE"]), state["ISPLIT_TORCHSERVE_METRICS_URL"])  # fmt: skip
    finally:
        script("stop")
        shutil.rmtree(root, ignore_errors=True)


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
        return {"X-Isplit-Top-K": self.top_k}

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
        context.status, context.top_k = None, request.headers.get("x-isplit-top-k", "5")
        [body] = handler.handle([{"body": await request.body()}], context)
        return Response(body, status_code=context.status or 200, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def fastapi_endpoint(model_dir: Path, name: str) -> Iterator[str]:
    """The bare endpoint for the model in ``model_dir`` (own process); its predictions URL."""
    [port] = free_ports(1)
    command = [sys.executable, __file__, "--serve-fastapi", str(model_dir), "--port", str(port)]
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


# -- load generation ------------------------------------------------------------------------


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
                         headers={**HEADERS, "X-Isplit-Top-K": "1"})  # fmt: skip
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"{url} answered {response.status}: {body[:300]!r}")
            out += [p[0]["class"] for p in json.loads(body)["predictions"]]
    finally:
        conn.close()
    return torch.tensor(out)


# -- the measurements -----------------------------------------------------------------------


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


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the client side: one image at a time, and two cores shared with servers
    if args.serve_fastapi:
        run_fastapi(args.serve_fastapi, args.port)
        return 0
    concurrency = [int(c) for c in args.concurrency.split(",")]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report = Report(machine=machine(), model={})

    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    model, info, checkpoint = reference_model(args, train, test)
    log(f"retraining a bottleneck at {args.cut} (ratio {args.ratio}, {args.bottleneck_epochs} epochs) ...")
    budget = BottleneckSpec(compression_ratio=args.ratio, epochs=args.bottleneck_epochs, lr=5e-3, batch_size=64)
    outcome = retrain_split(model, info, args.cut, train.subset(None, args.train_images), test, budget)
    pair = outcome.pair
    code_shape = tuple(pair.code_shape)
    image_shape = tuple(test.images.shape[1:])
    report.model = {"checkpoint": str(checkpoint), "arch": info.arch, "width": info.width, "cut": args.cut,
                    "ratio": args.ratio, "code_shape": list(code_shape), "image_shape": list(image_shape),
                    "accuracy_full": outcome.accuracy_original, "accuracy_split": outcome.accuracy_split,
                    "head_flops": outcome.head_flops, "tail_flops": outcome.tail_flops}  # fmt: skip
    export = args.work_dir / "export"
    shutil.rmtree(export, ignore_errors=True)
    files = export_pair(pair, info, export / "pair", {"model_name": "bench-tail", "dataset": "fashion-mnist"})
    full_dir = export_full_image(model, info, image_shape, export / "full", "bench-full")
    mars = export / "mars"
    tail_mar = ts.build_mar(files["tail.pt"], files["tail.json"], "bench-tail", "1.0", mars)
    full_mar = ts.build_mar(full_dir / "tail.pt", full_dir / "tail.json", "bench-full", "1.0", mars)

    # Edge side: the head and the encoder, one image at a time.
    head = torch.jit.load(str(files["head.pt"])).eval()
    x_test = to_model_input(test.images, info.input_size, info.mean, info.std)
    with torch.inference_mode():
        codes = torch.cat([head(x_test[i : i + 500]) for i in range(0, len(x_test), 500)])
        full_top1 = torch.cat([model(x_test[i : i + 500]).argmax(1) for i in range(0, len(x_test), 500)])
        tail = torch.jit.load(str(files["tail.pt"])).eval()
        split_fp32_top1 = torch.cat([tail(codes[i : i + 500]).argmax(1) for i in range(0, len(codes), 500)])
        one = x_test[:1]
        report.edge = {"head_ms": median_ms(lambda: head(one))}
    for enc in ENCODINGS:
        report.edge[f"encode_{enc}_ms"] = median_ms(lambda enc=enc: wire.encode(codes[:1], enc))
    pngs = []
    for i in range(200):
        path = args.work_dir / "sample.png"
        Image.fromarray(test.images[i, 0].numpy()).save(path)
        pngs.append(path.stat().st_size)
    raw = int(np.prod(image_shape))
    pixels = test.images.float()
    payloads = {enc: [wire.encode(codes[i : i + 1], enc) for i in range(256)] for enc in ENCODINGS}
    payloads["full"] = [wire.encode(pixels[i : i + 1], "fp16") for i in range(256)]  # integers: exact in fp16
    report.payload = {"raw_image_bytes": raw, "png_mean_bytes": statistics.fmean(pngs)}
    for key, items in payloads.items():
        report.payload[f"{key}_bytes"] = len(items[0])
        report.payload[f"{key}_ratio_to_raw"] = len(items[0]) / raw

    # In-process: the handler without any server.
    handler, context = load_handler(export / "pair", "bench-tail")
    report.in_process = time_in_process(handler, context, payloads["fp16"][0], 2000)
    del handler

    reuse = args.inference_url is not None
    main_server = (
        nullcontext(Server(args.inference_url, args.management_url, args.model_store, args.metrics_url))
        if reuse
        else private_torchserve({}, {})
    )
    tag = f"-{os.getpid()}"
    tail_name, batched_name, full_name = f"bench-tail{tag}", f"bench-tail-batched{tag}", f"bench-full{tag}"
    with (
        main_server as server,
        fastapi_endpoint(export / "pair", "fastapi-tail") as fastapi_url,
        fastapi_endpoint(full_dir, "fastapi-full") as fastapi_full_url,
    ):
        log(f"TorchServe at {server.inference_url}; registering the tail and the full-image endpoint ...")
        kw = {"batch_size": args.batch_size, "delay_ms": args.max_batch_delay_ms, "workers": args.workers}
        tail_url = serve(server, tail_mar, tail_name, **kw)
        full_url = serve(server, full_mar, full_name, **kw)
        batched_url = serve(server, tail_mar, batched_name, **{**kw, "delay_ms": args.batched_delay_ms})
        try:
            log("agreement on the test set ...")
            for enc in ENCODINGS:
                split_top1 = served_top1(tail_url, codes, enc)
                report.agreement[enc] = {
                    "agreement_with_full": float((split_top1 == full_top1).float().mean()),
                    "agreement_with_split_fp32": float((split_top1 == split_fp32_top1).float().mean()),
                    "accuracy": float((split_top1 == test.labels).float().mean()),
                }
            served_full = served_top1(full_url, pixels, "fp16")
            report.agreement["full-image"] = {
                "agreement_with_full": float((served_full == full_top1).float().mean()),
                "accuracy": float((served_full == test.labels).float().mean()),
            }
            endpoints = [  # label, server-side name (None: not TorchServe), URL, payloads
                ("torchserve tail", tail_name, tail_url, payloads["fp16"]),
                (f"torchserve tail {args.batched_delay_ms}ms", batched_name, batched_url, payloads["fp16"]),
                ("fastapi tail (bare)", None, fastapi_url, payloads["fp16"]),
                ("torchserve full image", full_name, full_url, payloads["full"]),
                ("fastapi full image", None, fastapi_full_url, payloads["full"]),
            ]
            log(f"warming up (the JVM compiles the request path): {args.warmup} requests per endpoint ...")
            for _label, _name, url, items in endpoints:
                load_test(url, items, 16, 0, warmup=args.warmup)
            log("latency and throughput ...")
            for c in concurrency:
                for enc in ENCODINGS:
                    report.latency.append(
                        measure_batched(
                            "torchserve tail", server, tail_name, tail_url, enc, payloads[enc], c, args.requests
                        )
                    )
                for label, name, url, items in endpoints[1:]:
                    enc = "fp16"
                    if name is None:
                        report.latency.append(measure(label, url, enc, items, c, args.requests))
                    else:
                        report.latency.append(measure_batched(label, server, name, url, enc, items, c, args.requests))
            log(f"head to head, TorchServe against the bare endpoint ({args.rounds} alternating rounds) ...")
            report.head_to_head = head_to_head(server, endpoints[:3], args)
        finally:
            if reuse:
                for name in (tail_name, batched_name, full_name):
                    ts.unregister(server.management_url, name)
                    (server.model_store / f"{name}.mar").unlink(missing_ok=True)

    if not args.no_tuning and not reuse:
        report.tuning = tuning_experiments(tail_mar, payloads["fp16"], args)
    report.machine["load_average_after"] = os.getloadavg()
    report.goals = goals(report)
    print_report(report)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(asdict(report), indent=1))
    failed = sum(r.errors for r in report.latency) + sum(t.get("errors", 0) for t in report.tuning)
    return 1 if failed else 0


def head_to_head(server: Server, endpoints: list[tuple], args: argparse.Namespace) -> dict:
    """fp16 at concurrency 1 and 16 on each endpoint in turn, for ``args.rounds`` rounds; the
    medians over rounds, so that a change of load on the machine hits every endpoint alike.

    ``endpoints`` holds ``(label, TorchServe model name or None, URL, payloads)``."""
    rows: dict[str, dict[str, list[LoadResult]]] = {label: {"c1": [], "c16": []} for label, *_ in endpoints}
    for _ in range(args.rounds):
        for label, name, url, items in endpoints:
            for key, c, n in (("c1", 1, args.requests), ("c16", 16, 2 * args.requests)):
                result = (
                    measure(label, url, "fp16", items, c, n)
                    if name is None
                    else measure_batched(label, server, name, url, "fp16", items, c, n)
                )
                rows[label][key].append(result)
    out: dict = {"rounds": args.rounds, "endpoints": {}}
    for label, by_c in rows.items():
        batches = [r.mean_batch for r in by_c["c16"] if r.mean_batch is not None]
        out["endpoints"][label] = {
            "c1_p50_ms": statistics.median(r.p50_ms for r in by_c["c1"]),
            "c1_rps": statistics.median(r.throughput_rps for r in by_c["c1"]),
            "c16_p50_ms": statistics.median(r.p50_ms for r in by_c["c16"]),
            "c16_rps": statistics.median(r.throughput_rps for r in by_c["c16"]),
            "c16_mean_batch": statistics.median(batches) if batches else None,
        }
    return out


# -- tuning ---------------------------------------------------------------------------------

STOCK = {key: None for key in TUNING_KEYS}  # TorchServe's defaults for every tuning key
TORCH_DEFAULT_THREADS = {THREADS_ENV: "0"}  # the worker on torch's default thread count (one per core)
# log4j2 for the experiment "quiet logging": TorchServe's own configuration (ts/frontend's
# log4j2.xml) logs about a dozen lines per request at INFO/DEBUG, most of them twice (the
# org.pytorch.serve logger and the root logger share the ts_log appender) and once more to
# stdout; here the per-request loggers are at WARN, nothing is duplicated, and there is no
# access log. Model metrics are unaffected: the frontend parses them before logging.
QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <RollingFile name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/ts_log.%d{dd-MMM}.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerThread" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.BatchAggregator" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerLifeCycle" level="warn"/>
    <Logger name="org.pytorch.serve.job" level="warn"/>
    <Root level="info"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


def quiet_logging(directory: Path) -> dict[str, str]:
    """Config overrides that point TorchServe's JVM at :data:`QUIET_LOG4J2` (written to ``directory``)."""
    path = directory / "log4j2-quiet.xml"
    path.write_text(QUIET_LOG4J2)
    return {"vmargs": f"-Dlog4j.configurationFile=file://{path}"}


def tuning_experiments(tail_mar: Path, payloads: Sequence[bytes], args: argparse.Namespace) -> list[dict]:
    """fp16 at concurrency 1 and 16 under server and registration variants, one change at a time.

    Every variant runs at once (a TorchServe per server variant, each registration warmed up);
    rounds take the variants in turn and the medians are reported, as in :func:`head_to_head`."""
    trainer_default = [("batch 8, delay 5 ms (trainer default)", 8, 5, 1)]
    servers = [
        ("stock TorchServe, torch default threads", STOCK, TORCH_DEFAULT_THREADS, trainer_default),
        ("stock TorchServe, handler on 1 thread", STOCK, {}, trainer_default),
        ("project config.properties", {}, {}, [
            *trainer_default,
            ("batch 1 (no batching)", 1, 0, 1),
            ("batch 16, delay 0 ms", 16, 0, 1),
            ("batch 16, delay 1 ms", 16, 1, 1),
            ("batch 16, delay 2 ms", 16, 2, 1),
            ("batch 16, delay 0 ms, 2 workers", 16, 0, 2),
            ("batch 16, delay 1 ms, 2 workers", 16, 1, 2),
        ]),
        ("project config + quiet log4j2", quiet_logging(args.work_dir), {}, [
            ("batch 16, delay 0 ms", 16, 0, 1),
            ("batch 16, delay 1 ms", 16, 1, 1),
        ]),
    ]  # fmt: skip
    cells = []  # (server label, registration label, server, model name, URL)
    results: dict[int, dict[str, list[LoadResult]]] = {}
    with ExitStack() as stack:
        for server_label, overrides, env, registrations in servers:
            log(f"tuning: starting {server_label} ...")
            server = stack.enter_context(private_torchserve(overrides, env))
            for index, (reg_label, batch, delay, workers) in enumerate(registrations):
                name = f"tune-{index}"
                url = serve(server, tail_mar, name, batch_size=batch, delay_ms=delay, workers=workers)
                load_test(url, payloads, 16, 0, warmup=args.warmup)
                cells.append((server_label, reg_label, server, name, url))
        for round_ in range(args.rounds):
            log(f"tuning: round {round_ + 1} of {args.rounds} over {len(cells)} variants ...")
            for i, (_s, _r, server, name, url) in enumerate(cells):
                by_c = results.setdefault(i, {"c1": [], "c16": []})
                by_c["c1"].append(measure_batched("tuning", server, name, url, "fp16", payloads, 1, args.requests))
                by_c["c16"].append(
                    measure_batched("tuning", server, name, url, "fp16", payloads, 16, 2 * args.requests)
                )
    rows = []
    for i, (server_label, reg_label, *_rest) in enumerate(cells):
        c1, c16 = results[i]["c1"], results[i]["c16"]
        batches = [r.mean_batch for r in c16 if r.mean_batch is not None]
        rows.append({
            "server": server_label,
            "registration": reg_label,
            "c1_p50_ms": statistics.median(r.p50_ms for r in c1),
            "c1_p95_ms": statistics.median(r.p95_ms for r in c1),
            "c1_rps": statistics.median(r.throughput_rps for r in c1),
            "c16_p50_ms": statistics.median(r.p50_ms for r in c16),
            "c16_rps": statistics.median(r.throughput_rps for r in c16),
            "c16_mean_batch": statistics.median(batches) if batches else None,
            "errors": sum(r.errors for r in (*c1, *c16)),
        })  # fmt: skip
    return rows


# -- report ---------------------------------------------------------------------------------


def goals(report: Report) -> dict:
    """The issue's goals per TorchServe registration, from the head-to-head medians: p50 at
    concurrency 1 within 2x of the bare endpoint's; throughput at concurrency 16 at least 2x
    (read both ways: against its own at concurrency 1, and against the bare endpoint's at 16);
    and the test-set agreement of the split model with the full model."""
    out: dict = {"torchserve": {}}
    endpoints = report.head_to_head.get("endpoints", {})
    bare = endpoints.get("fastapi tail (bare)")
    for label, e in endpoints.items():
        if bare is None or not label.startswith("torchserve"):
            continue
        p50_ratio = e["c1_p50_ms"] / bare["c1_p50_ms"]
        own_ratio = e["c16_rps"] / e["c1_rps"]
        bare_ratio = e["c16_rps"] / bare["c16_rps"]
        out["torchserve"][label] = {
            "p50_ratio_to_bare_c1": p50_ratio,
            "p50_goal_met": p50_ratio <= 2.0,
            "throughput_c16_over_own_c1": own_ratio,
            "throughput_c16_over_bare_c16": bare_ratio,
            "throughput_goal_met_vs_own_c1": own_ratio >= 2.0,
            "throughput_goal_met_vs_bare_c16": bare_ratio >= 2.0,
        }
    for enc, target in (("fp16", 0.99), ("int8", 0.97)):
        if enc in report.agreement:
            out[f"agreement_{enc}_goal_met"] = report.agreement[enc]["agreement_with_full"] >= target
    return out


def print_report(r: Report) -> None:
    m = r.model
    print(f"\nmachine: {r.machine['cpus']} CPUs, load average {fmt_load(r.machine['load_average'])} before, "
          f"{fmt_load(r.machine['load_average_after'])} after; torch {r.machine['torch']}")  # fmt: skip
    print(f"model: {m['arch']} width {m['width']}, cut {m['cut']} (ratio {m['ratio']}), code {m['code_shape']}, "
          f"image {m['image_shape']}; test accuracy full {m['accuracy_full']:.4f}, split {m['accuracy_split']:.4f}")  # fmt: skip
    e = r.edge
    print(f"edge (1 image, 1 thread): head {e['head_ms']:.3f} ms; encode " +
          ", ".join(f"{enc} {e[f'encode_{enc}_ms']:.3f} ms" for enc in ENCODINGS))  # fmt: skip

    print("\npayload per image (one wire message, N=1):")
    print(f"  raw image {r.payload['raw_image_bytes']} B (uint8), PNG {r.payload['png_mean_bytes']:.0f} B mean")
    for key in (*ENCODINGS, "full"):
        label = f"code {key}" if key != "full" else "full image fp16"
        print(f"  {label:<16} {r.payload[f'{key}_bytes']:>6} B  = {r.payload[f'{key}_ratio_to_raw']:.3f} x raw")

    print("\nagreement on the 10,000 test images (predictions served by TorchServe):")
    for key, a in r.agreement.items():
        vs_fp32 = a.get("agreement_with_split_fp32")
        extra = f"   with the split model in fp32 {100 * vs_fp32:6.2f} %" if vs_fp32 is not None else ""
        print(f"  {key:<11} with the full model {100 * a['agreement_with_full']:6.2f} %{extra}"
              f"   accuracy {100 * a['accuracy']:6.2f} %")  # fmt: skip

    print(f"\nlatency (single-image requests, top-{TOP_K}; batch = mean codes per forward pass):")
    print(
        f"  {'endpoint':<24}{'enc':<6}{'conc':>5}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>9}{'B/req':>8}{'batch':>7}{'err':>5}"
    )
    for x in r.latency:
        batch = f"{x.mean_batch:.1f}" if x.mean_batch is not None else "-"
        print(f"  {x.endpoint:<24}{x.encoding:<6}{x.concurrency:>5}{x.p50_ms:>9.2f}{x.p95_ms:>9.2f}"
              f"{x.throughput_rps:>9.0f}{x.bytes_per_request:>8.0f}{batch:>7}{x.errors:>5}")  # fmt: skip
    print(
        f"  {'in-process handler':<24}{'fp16':<6}{'-':>5}{r.in_process['p50_ms']:>9.2f}{r.in_process['p95_ms']:>9.2f}"
    )

    h = r.head_to_head
    if h:
        print(f"\nhead to head (fp16; medians of {h['rounds']} rounds taking the endpoints in turn):")
        print(f"  {'endpoint':<24}{'c1 p50 ms':>11}{'c1 req/s':>10}{'c16 p50 ms':>12}{'c16 req/s':>11}{'batch':>7}")
        for label, e in h["endpoints"].items():
            batch = f"{e['c16_mean_batch']:.1f}" if e["c16_mean_batch"] is not None else "-"
            print(f"  {label:<24}{e['c1_p50_ms']:>11.2f}{e['c1_rps']:>10.0f}{e['c16_p50_ms']:>12.2f}"
                  f"{e['c16_rps']:>11.0f}{batch:>7}")  # fmt: skip

    if r.tuning:
        print("\ntuning (fp16 tail; medians of the rounds; each server variant its own TorchServe):")
        print(f"  {'server':<42}{'registration':<40}{'c1 p50':>8}{'c1 p95':>8}{'c1 r/s':>8}{'c16 r/s':>9}{'batch':>7}")
        for t in r.tuning:
            batch = f"{t['c16_mean_batch']:.1f}" if t["c16_mean_batch"] is not None else "-"
            print(f"  {t['server']:<42}{t['registration']:<40}{t['c1_p50_ms']:>8.2f}{t['c1_p95_ms']:>8.2f}"
                  f"{t['c1_rps']:>8.0f}{t['c16_rps']:>9.0f}{batch:>7}")  # fmt: skip

    g = r.goals
    print("\ngoals:")
    for label, t in g["torchserve"].items():
        print(f"  {label}: p50 c=1 / bare {t['p50_ratio_to_bare_c1']:.2f} (<= 2: {yes(t['p50_goal_met'])}); "
              f"c=16 throughput / own c=1 {t['throughput_c16_over_own_c1']:.2f} "
              f"(>= 2: {yes(t['throughput_goal_met_vs_own_c1'])}), "
              f"/ bare c=16 {t['throughput_c16_over_bare_c16']:.2f} (>= 2: {yes(t['throughput_goal_met_vs_bare_c16'])})")  # fmt: skip
    for enc, target in (("fp16", 99), ("int8", 97)):
        if f"agreement_{enc}_goal_met" in g:
            print(f"  {enc} agreement with the full model >= {target} %: {yes(g[f'agreement_{enc}_goal_met'])}")


def yes(ok: bool) -> str:
    return "met" if ok else "NOT met"


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


if __name__ == "__main__":
    sys.exit(main())
