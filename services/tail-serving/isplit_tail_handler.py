"""TorchServe handler for isplit tails: bottleneck codes in, top-k classes out.

The model archive (``<model_name>.mar``, built by :func:`isplit.torchserve.build_mar`) holds
``tail.pt`` (TorchScript, ``forward(code (N, *code_shape) float32) -> logits (N, K)``) and
``tail.json`` (``class_names``, ``code_shape``, ``model_name``, ...). The worker's Python must be
able to ``import isplit`` (the project venv locally, the image in a cluster): the body is
decoded by :mod:`isplit.wire`, the one wire format, never by pickle.

Request (``POST /predictions/<model_name>``, optional header ``X-Isplit-Top-K: K``), one of:

* body = a wire message (``isplit.wire.encode``) of shape ``(N, *code_shape)`` or ``code_shape``;
* for debugging, JSON ``{"tensor": nested list}`` (or ``{"data": ...}``) of the same shapes.

Response (200): ``{"model": name, "predictions": P}`` where a top-k list is
``[{"class": index, "name": class_name, "probability": p}, ...]`` (most probable first; K from
the ``X-Isplit-Top-K`` header, default 5, at most the number of classes) and ``P`` mirrors the
input: one top-k list for a ``code_shape`` tensor, a list of ``N`` top-k lists for a batch.

A request that cannot be decoded gets HTTP 400 with the reason (status line and JSON body
``{"code": 400, "type": "BadRequest", "message": ...}``) while the other requests of the same
server-side batch are answered normally; the worker stays up.

Custom metrics (declared in ``metrics.yaml``, labels ``ModelName``, ``Level`` and ``Hostname``):
``isplit_tail_decode_seconds`` (histogram, per request), ``isplit_tail_batch_size`` (histogram,
codes per forward pass), ``isplit_tail_payload_bytes`` (histogram, request body bytes) and
``isplit_tail_bad_requests_total`` (counter).

Environment: ``ISPLIT_TAIL_MAX_BYTES`` (largest request body, default 64 MiB) and
``ISPLIT_TAIL_TORCH_THREADS`` (intra-op threads per worker, default 1; 0 = torch's default,
one per core). One thread is the right default for small tails on shared CPUs: on the 2-core
development machine two threads per worker cut throughput at concurrency 16 by 3.5x and
raised p95 at concurrency 1 from 17 ms to 114 ms (``benchmarks/bench_serving.py``).

TorchServe instantiates the one class defined in this module; keep it the only class.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from isplit import wire

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
TOP_K_HEADER = wire.TOP_K_HEADER
MAX_BYTES = int(os.environ.get("ISPLIT_TAIL_MAX_BYTES", wire.DEFAULT_MAX_BYTES))
# Intra-op threads per worker (0 = torch's default, one per core). A tail is small and each
# worker runs one batch at a time: one thread keeps the threads of several workers, the
# frontend and the client from spinning against each other on a shared machine.
TORCH_THREADS = int(os.environ.get("ISPLIT_TAIL_TORCH_THREADS", "1"))


class TailHandler:
    """Lifecycle: ``initialize`` loads the tail; ``handle`` = preprocess, inference, postprocess."""

    def __init__(self) -> None:
        self.model: torch.jit.ScriptModule | None = None
        self.model_name = ""
        self.class_names: list[str] = []
        self.code_shape: tuple[int, ...] = ()
        self.device = torch.device("cpu")
        self.initialized = False

    def initialize(self, context) -> None:
        """Load ``tail.pt`` (TorchScript, no unpickling) and ``tail.json`` from the model dir."""
        properties = context.system_properties
        model_dir = properties["model_dir"]
        with open(os.path.join(model_dir, "tail.json"), encoding="utf-8") as f:
            meta = json.load(f)
        self.class_names = [str(name) for name in meta["class_names"]]
        self.code_shape = tuple(int(d) for d in meta["code_shape"])
        self.model_name = context.model_name
        if TORCH_THREADS > 0:
            torch.set_num_threads(TORCH_THREADS)
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
        self.model = torch.jit.load(os.path.join(model_dir, "tail.pt"), map_location=self.device)
        self.model.eval()
        self.initialized = True
        logger.info(
            "isplit tail %s loaded on %s: code_shape=%s, %d classes",
            self.model_name,
            self.device,
            self.code_shape,
            len(self.class_names),
        )

    def handle(self, data: list[dict], context) -> list[Any]:
        """Answer one server-side batch: a list of requests in, one response per request out."""
        decoded, decode_seconds = [], []
        for idx, request in enumerate(data):
            start = time.perf_counter()
            decoded.append(self.preprocess(request, _header(context, idx, TOP_K_HEADER)))
            decode_seconds.append(time.perf_counter() - start)
        good = [item for item in decoded if not isinstance(item, str)]
        logits = self.inference(torch.cat([codes for codes, _, _ in good])) if good else None
        responses = self.postprocess(decoded, logits)
        for idx, item in enumerate(decoded):
            context.set_response_content_type(idx, "application/json")
            if isinstance(item, str):
                context.set_response_status(400, _status_phrase(item), idx=idx)
        self._emit_metrics(context, data, decoded, decode_seconds)
        # A compact JSON string: TorchServe would pretty-print a dict (json.dumps(indent=2)).
        return [json.dumps(response, separators=(",", ":")) for response in responses]

    def preprocess(self, request: dict, top_k: str | None = None) -> tuple[torch.Tensor, bool, int] | str:
        """Decode one request to ``(codes (n, *code_shape) float32, batched, top_k)``.

        ``top_k`` is the raw ``X-Isplit-Top-K`` header value, if the request had one.

        A request that cannot be decoded becomes its error message (a ``str``) instead, so
        one bad request never fails the others in its batch.
        """
        try:
            return self._decode_request(request, top_k)
        except (wire.WireError, ValueError, TypeError) as exc:
            return str(exc)

    @torch.inference_mode()
    def inference(self, codes: torch.Tensor) -> torch.Tensor:
        """Run the tail: ``(N, *code_shape) float32`` codes to ``(N, K)`` logits on the CPU."""
        return self.model(codes.to(self.device)).float().cpu()

    def postprocess(self, decoded: list, logits: torch.Tensor | None) -> list[dict]:
        """Turn logits into one JSON-able response per request, in request order."""
        responses: list[dict] = []
        start = 0
        probabilities = torch.softmax(logits, dim=1) if logits is not None else None
        for item in decoded:
            if isinstance(item, str):
                responses.append({"code": 400, "type": "BadRequest", "message": item})
                continue
            codes, batched, top_k = item
            rows = probabilities[start : start + codes.shape[0]]
            start += codes.shape[0]
            per_image = [self._top_k(row, top_k) for row in rows]
            responses.append({"model": self.model_name, "predictions": per_image if batched else per_image[0]})
        return responses

    def _decode_request(self, request: dict, top_k_header: str | None) -> tuple[torch.Tensor, bool, int]:
        body = request.get("body")
        if body is None:
            body = request.get("data")
        if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
            raise ValueError("empty request body: send an isplit wire message (isplit.wire.encode)")
        top_k = self._parse_top_k(top_k_header)
        if isinstance(body, (bytes, bytearray)) and bytes(body[:4]) == wire.MAGIC:
            codes = wire.decode(bytes(body), max_bytes=MAX_BYTES)
        else:
            codes = self._decode_json(body)
        return (*self._check_shape(codes), top_k)

    def _decode_json(self, body: Any) -> torch.Tensor:
        if isinstance(body, (bytes, bytearray, str)):
            try:
                body = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(
                    f'body is neither an isplit wire message (magic {wire.MAGIC!r}) nor JSON {{"tensor": [...]}}'
                ) from None
            except RecursionError:  # an untrusted body: too deep for the parser is a bad request
                raise ValueError("JSON body is nested too deeply") from None
        if not isinstance(body, dict) or not ({"tensor", "data"} & body.keys()):
            raise ValueError('JSON body must be an object {"tensor": nested list of numbers}')
        values = body.get("tensor", body.get("data"))
        try:
            return torch.tensor(values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError includes RecursionError
            raise ValueError(f'"tensor" must be a rectangular nested list of numbers: {exc}') from None

    def _check_shape(self, codes: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Return ``(codes (n, *code_shape), batched)``; refuse other shapes and non-finite values."""
        shape = tuple(codes.shape)
        if shape == self.code_shape:
            codes, batched = codes.unsqueeze(0), False
        elif len(shape) == len(self.code_shape) + 1 and shape[1:] == self.code_shape and shape[0] > 0:
            batched = True
        else:
            expected = ", ".join(str(d) for d in self.code_shape)
            raise ValueError(f"shape mismatch: got {shape}, expected (N, {expected}) with N >= 1 or ({expected})")
        if not torch.isfinite(codes).all():
            raise ValueError("the code tensor holds NaN or inf")
        return codes, batched

    def _parse_top_k(self, text: str | None) -> int:
        if text is None:
            return min(DEFAULT_TOP_K, len(self.class_names))
        if not text.strip().isdigit() or not 1 <= int(text) <= len(self.class_names):
            raise ValueError(f"{TOP_K_HEADER} must be an integer in [1, {len(self.class_names)}], got {text!r}")
        return int(text)

    def _top_k(self, probabilities: torch.Tensor, k: int) -> list[dict]:
        values, indices = torch.topk(probabilities, k)
        return [
            {"class": int(i), "name": self.class_names[int(i)], "probability": float(p)}
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def _emit_metrics(self, context, data: list[dict], decoded: list, decode_seconds: list[float]) -> None:
        metrics = context.metrics
        if metrics is None:
            return

        def add(name: str, value: float, unit: str, kind: MetricTypes) -> None:
            # Fresh Dimension lists: TorchServe appends default dimensions to the list it gets.
            dims = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
            metrics.add_metric(name, value, unit, dimensions=dims, metric_type=kind)

        for request, item, seconds in zip(data, decoded, decode_seconds, strict=True):
            add("isplit_tail_decode_seconds", seconds, "s", MetricTypes.HISTOGRAM)
            body = request.get("body", request.get("data"))
            if isinstance(body, (bytes, bytearray)):
                add("isplit_tail_payload_bytes", len(body), "B", MetricTypes.HISTOGRAM)
            if isinstance(item, str):
                add("isplit_tail_bad_requests_total", 1, "count", MetricTypes.COUNTER)
        images = sum(item[0].shape[0] for item in decoded if not isinstance(item, str))
        if images:
            add("isplit_tail_batch_size", images, "count", MetricTypes.HISTOGRAM)


def _header(context, idx: int, name: str) -> str | None:
    """A request header, matched case-insensitively (TorchServe keeps the client's spelling)."""
    headers = context.get_all_request_header(idx) or {}
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted and isinstance(v, str)), None)


def _status_phrase(message: str) -> str:
    """An HTTP reason phrase: one printable ASCII line (Netty refuses CR/LF), at most 200 chars."""
    phrase = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in message)
    return phrase[:200] if len(phrase) <= 200 else phrase[:197] + "..."
