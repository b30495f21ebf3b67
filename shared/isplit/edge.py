"""The edge client: run the head on the device, send the bottleneck code to the tail.

``EdgeClient`` loads an exported head (``head.pt`` for torch, ``head.onnx`` for ONNX Runtime,
``head.json`` beside it), preprocesses image files
exactly as in training, runs the head, encodes the code with the wire format, POSTs it to the
tail's TorchServe endpoint (timeout and retries) and returns predictions with a timing
breakdown. ``isplit edge predict`` is its command line; ``isplit edge profile`` measures this
machine as an edge device (head time per cut) for ``isplit plan``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
from PIL import Image, UnidentifiedImageError

from isplit import IsplitError, wire
from isplit.data import preprocess_image

# Answers worth another try: the server is overloaded or restarting, not refusing the input.
_RETRY_STATUSES = frozenset({500, 502, 503, 504, 507})
#: The environment variable ``isplit edge predict --inference-key`` defaults to.
INFERENCE_KEY_ENV = "ISPLIT_INFERENCE_KEY"
_HEAD_KEYS = ("in_channels", "input_size", "mean", "std")


@dataclass
class EdgePrediction:
    """Predictions for a batch of images and where the time went.

    ``predictions[i]`` is image ``i``'s top-k list ``[{"class", "name", "probability"}, ...]``;
    times are milliseconds; ``bytes_sent`` is the request body (one wire message) in bytes;
    ``extra`` holds ``preprocess_ms`` when the images came from files.
    """

    predictions: list[list[dict]]
    head_ms: float
    encode_ms: float
    network_tail_ms: float
    total_ms: float
    bytes_sent: int
    extra: dict = field(default_factory=dict)


class EdgeClient:
    """Runs a split model's head locally and its tail through an HTTP endpoint.

    ``timeout_s`` bounds each HTTP attempt (seconds); a connection failure, a timeout or a
    5xx answer is retried ``retries`` times with exponential back-off (0.2 s, 0.4 s, ...);
    a 4xx answer (bad input) is not. User errors raise :class:`isplit.IsplitError`.
    ``inference_key`` is TorchServe's inference key (token authorization), sent as a Bearer token.
    """

    def __init__(
        self,
        head_path: Path,
        endpoint: str,
        *,
        encoding: str = "fp16",
        timeout_s: float = 10,
        retries: int = 2,
        runtime: str = "torch",
        inference_key: str | None = None,
    ) -> None:
        if encoding not in wire.ENCODINGS:
            raise IsplitError(f"unknown encoding {encoding!r}; choose one of {', '.join(wire.ENCODINGS)}")
        if timeout_s <= 0 or retries < 0:
            raise IsplitError(f"timeout must be > 0 s and retries >= 0, got {timeout_s} and {retries}")
        head_path = Path(head_path)
        meta_path = head_path.with_suffix(".json")
        if not head_path.is_file() or not meta_path.is_file():
            raise IsplitError(f"head {head_path} or its metadata {meta_path} does not exist")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IsplitError(f"head metadata {meta_path} is not readable JSON: {exc}") from exc
        missing = [k for k in _HEAD_KEYS if not isinstance(self.meta, dict) or k not in self.meta]
        if missing:
            raise IsplitError(f"head metadata {meta_path} lacks {', '.join(missing)}")
        if runtime not in RUNTIMES:
            raise IsplitError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        self.runtime = runtime
        self.head = _load_torchscript(head_path) if runtime == "torch" else OnnxHead(head_path, self.meta)
        self.endpoint, self.encoding, self.timeout_s, self.retries = endpoint, encoding, timeout_s, retries
        self.session = requests.Session()
        if inference_key:
            self.session.headers["Authorization"] = f"Bearer {inference_key}"

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self.session.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def preprocess(self, paths: list[Path]) -> torch.Tensor:
        """Image files -> ``(N, C, S, S)`` float32, as in training (``isplit.data.preprocess_image``)."""
        return load_images(paths, **{k: self.meta[k] for k in _HEAD_KEYS})

    def predict_tensor(self, x: torch.Tensor, top_k: int = 3) -> EdgePrediction:
        """Predict for preprocessed images ``(N, C, S, S)`` float32: head, encode, POST."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            code = self.head(x)
        t1 = time.perf_counter()
        payload = wire.encode(code, self.encoding)
        t2 = time.perf_counter()
        body = self._post(payload, top_k)
        t3 = time.perf_counter()
        predictions = body.get("predictions") if isinstance(body, dict) else None
        if not isinstance(predictions, list) or len(predictions) != x.shape[0]:
            raise IsplitError(f"tail at {self.endpoint} answered without {x.shape[0]} predictions: {str(body)[:200]}")
        return EdgePrediction(
            predictions=predictions,
            head_ms=(t1 - t0) * 1e3,
            encode_ms=(t2 - t1) * 1e3,
            network_tail_ms=(t3 - t2) * 1e3,
            total_ms=(t3 - t0) * 1e3,
            bytes_sent=len(payload),
        )

    def predict_files(self, paths: list[Path], top_k: int = 3) -> EdgePrediction:
        """Predict for image files (one request for all of them); adds ``extra["preprocess_ms"]``."""
        t0 = time.perf_counter()
        x = self.preprocess(paths)
        preprocess_ms = (time.perf_counter() - t0) * 1e3
        out = self.predict_tensor(x, top_k)
        out.extra["preprocess_ms"] = preprocess_ms
        return out

    def _post(self, payload: bytes, top_k: int) -> dict:
        headers = {"Content-Type": "application/octet-stream", wire.TOP_K_HEADER: str(top_k)}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.2 * 2 ** (attempt - 1))
            try:
                r = self.session.post(self.endpoint, data=payload, headers=headers, timeout=self.timeout_s)
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
                raise IsplitError(f"invalid endpoint {self.endpoint!r}: {exc}") from exc
            except requests.Timeout:
                problem = f"no answer within {self.timeout_s:g} s"
                continue
            except requests.ConnectionError as exc:
                problem = f"connection failed ({_root_cause(exc)})"
                continue
            if r.status_code in _RETRY_STATUSES:
                problem = f"it answered {r.status_code}: {_server_message(r)}"
                continue
            if r.status_code != 200:
                raise IsplitError(f"tail at {self.endpoint} answered {r.status_code}: {_server_message(r)}")
            try:
                return r.json()
            except ValueError:
                raise IsplitError(f"tail at {self.endpoint} answered 200 without JSON: {r.text[:200]!r}") from None
        tries = "1 try" if self.retries == 0 else f"{self.retries + 1} tries"
        raise IsplitError(f"tail at {self.endpoint} unreachable after {tries}: {problem}")


RUNTIMES = ("torch", "onnxruntime")


def _load_torchscript(head_path: Path) -> torch.jit.ScriptModule:
    if head_path.suffix == ".onnx":
        head_path = head_path.with_suffix(".pt")
    try:
        with warnings.catch_warnings():
            # torch deprecates torch.jit, but TorchScript is the head's contract (CONTRACTS.md).
            warnings.filterwarnings("ignore", message=r"`torch\.jit", category=FutureWarning)
            return torch.jit.load(str(head_path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IsplitError(f"head {head_path} is not a TorchScript module: {first[:200]}") from exc


class OnnxHead:
    """The head's ONNX export run by ONNX Runtime (CPU): ``(N, C, S, S)`` float32 tensor in,
    code tensor out, like the TorchScript head. Uses ``head.onnx`` beside ``head_path`` and
    checks it against the SHA-256 that ``head.json`` records."""

    def __init__(self, head_path: Path, meta: dict) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise IsplitError("runtime onnxruntime needs the `onnxruntime` package (pip install onnxruntime)") from None
        from isplit.checkpoint import sha256_file

        entry = (meta.get("artifacts") or {}).get("onnx") or {}
        path = head_path if head_path.suffix == ".onnx" else head_path.with_name(str(entry.get("file", "head.onnx")))
        path = head_path.with_name(path.name)  # only a file beside head.json
        if not path.is_file():
            raise IsplitError(f"no ONNX head {path} (write one with `isplit export-head --format onnx`)")
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise IsplitError(f"ONNX head {path} does not match the checksum recorded in head.json")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise IsplitError(f"ONNX head {path} cannot be loaded: {str(exc)[:200]}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype("float32", copy=False)})
        return torch.from_numpy(out[0])


def load_images(
    paths: list[Path], *, in_channels: int, input_size: int, mean: list[float], std: list[float]
) -> torch.Tensor:
    """Read and preprocess image files as in training: ``(N, in_channels, S, S)`` float32."""
    if not paths:
        raise IsplitError("no image files given")
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(preprocess_image(im, in_channels=in_channels, input_size=input_size, mean=mean, std=std))
        except FileNotFoundError:
            raise IsplitError(f"image {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise IsplitError(f"cannot read image {path}: {exc}") from None
    return torch.stack(images)


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests error, e.g. ``[Errno 111] Connection refused``."""
    for _ in range(10):  # bounded: a cycle of causes would otherwise loop for ever
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    text = str(exc)
    # urllib3 prefixes the connection object: "<...HTTPConnection object at 0x..>: Failed to ..."
    return text.split(">: ", 1)[-1] if ">: " in text else text


def _server_message(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or r.text.strip() or r.reason)[:300]


def _cmd_predict(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    with EdgeClient(
        Path(args.head),
        args.endpoint,
        encoding=args.encoding,
        timeout_s=args.timeout,
        retries=args.retries,
        runtime=args.runtime,
        inference_key=args.inference_key,
    ) as client:
        full = info = None
        if args.compare_local:
            from isplit.checkpoint import load_model

            full, info = load_model(Path(args.compare_local))
        out = client.predict_files(paths, top_k=args.top_k)
    agree = None
    if full is not None and info is not None:
        # The full model gets its own checkpoint's preprocessing (identical to the head's when
        # the head was exported from that checkpoint).
        x = load_images(paths, in_channels=info.in_channels, input_size=info.input_size, mean=info.mean, std=info.std)
        with torch.inference_mode():
            local = full(x).argmax(1).tolist()
        agree = [bool(p) and p[0]["class"] == c for p, c in zip(out.predictions, local, strict=True)]
    for i, (path, preds) in enumerate(zip(paths, out.predictions, strict=True)):
        top = ", ".join(f"{p['name']} {p['probability']:.3f}" for p in preds)
        flag = "" if agree is None else ("  (full model agrees)" if agree[i] else "  (full model DISAGREES)")
        print(f"{path}: {top}{flag}")
    print(f"head run with {args.runtime}")
    print(
        f"head {out.head_ms:.1f} ms | encode {out.encode_ms:.2f} ms ({args.encoding}) | sent {out.bytes_sent} B | "
        f"network+tail {out.network_tail_ms:.1f} ms | total {out.total_ms:.1f} ms"
    )
    if agree is not None:
        print(f"agreement with the full model: {sum(agree)}/{len(agree)}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from isplit.checkpoint import load_model
    from isplit.cuts import find_cut_points
    from isplit.plan import measure_device

    model, info = load_model(Path(args.weights))
    shape = (info.in_channels, info.input_size, info.input_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    points = find_cut_points(model, shape)
    print(
        f"timing {sum(not p.skipped for p in points)} heads of {info.arch} on this machine ({args.repeats} runs each)"
    )
    profile = measure_device(
        model, shape, points, arch=info.arch, repeats=args.repeats, bottleneck_ratio=args.compression_ratio
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile.model_dump_json(indent=1))
    print(
        f"whole model {profile.total_ms:.2f} ms per image ({profile.gflops:.2f} GFLOP/s effective, "
        f"{profile.torch_threads} threads); fp16 encode {profile.encode_mb_per_s:.0f} MB/s"
    )
    print(f"wrote {out} (use it with `isplit plan --device-profile {out}`)")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="the edge client").add_subparsers(dest="edge_command", required=True)
    p = edge.add_parser("predict", help="run the head here, the tail on the server")
    p.add_argument("--head", required=True, help="head.pt or head.onnx exported by the trainer (head.json beside it)")
    p.add_argument("--endpoint", required=True, help="the tail's URL, e.g. http://127.0.0.1:8080/predictions/NAME")
    p.add_argument("--encoding", default="fp16", help=f"wire encoding: {', '.join(wire.ENCODINGS)}")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--runtime", default="torch", choices=RUNTIMES, help="run head.pt (torch) or head.onnx")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request attempt")
    p.add_argument("--retries", type=int, default=2, help="extra attempts on connection errors, timeouts and 5xx")
    p.add_argument(
        "--inference-key",
        default=os.environ.get(INFERENCE_KEY_ENV) or None,
        help=f"TorchServe's inference key (token authorization; default ${INFERENCE_KEY_ENV})",
    )
    p.add_argument("--compare-local", metavar="FULL_MODEL", help="also run this full checkpoint locally")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=_cmd_predict)
    prof = edge.add_parser("profile", help="time the model's heads at every cut on this machine")
    prof.add_argument("--weights", required=True, help="an isplit checkpoint")
    prof.add_argument("--repeats", type=int, default=20, help="timed runs per head (median)")
    prof.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    prof.add_argument(
        "--compression-ratio", type=int, default=4, help="the bottleneck the trainer inserts (timed after each head)"
    )
    prof.add_argument("--out", default="device-profile.json", help="profile JSON to write")
    prof.set_defaults(func=_cmd_profile)
