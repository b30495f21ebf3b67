"""The edge client: run the head on the device, send the bottleneck code to the tail.

``EdgeClient`` loads an exported head (``head.pt`` + ``head.json``), preprocesses image files
exactly as in training, runs the head, encodes the code with the wire format, POSTs it to the
tail's TorchServe endpoint (timeout and retries) and returns predictions with a timing
breakdown. ``isplit edge predict`` is its command line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
from PIL import Image, UnidentifiedImageError

from isplit import IsplitError, wire
from isplit.data import preprocess_image


@dataclass
class EdgePrediction:
    """Predictions for a batch of images and where the time went (milliseconds)."""

    predictions: list[list[dict]]
    head_ms: float
    encode_ms: float
    network_tail_ms: float
    total_ms: float
    bytes_sent: int
    extra: dict = field(default_factory=dict)


class EdgeClient:
    """Runs a split model's head locally and its tail through an HTTP endpoint."""

    def __init__(
        self, head_path: Path, endpoint: str, *, encoding: str = "fp16", timeout_s: float = 10, retries: int = 2
    ) -> None:
        head_path = Path(head_path)
        meta_path = head_path.with_suffix(".json")
        if not head_path.is_file() or not meta_path.is_file():
            raise IsplitError(f"head {head_path} or its metadata {meta_path} does not exist")
        if encoding not in wire.ENCODINGS:
            raise IsplitError(f"unknown encoding {encoding!r}; choose one of {', '.join(wire.ENCODINGS)}")
        self.meta = json.loads(meta_path.read_text())
        self.head = torch.jit.load(str(head_path), map_location="cpu").eval()
        self.endpoint, self.encoding, self.timeout_s, self.retries = endpoint, encoding, timeout_s, retries
        self.session = requests.Session()

    def preprocess(self, paths: list[Path]) -> torch.Tensor:
        """Image files -> ``(N, C, S, S)`` float32, as in training."""
        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    images.append(
                        preprocess_image(
                            im,
                            in_channels=self.meta["in_channels"],
                            input_size=self.meta["input_size"],
                            mean=self.meta["mean"],
                            std=self.meta["std"],
                        )
                    )
            except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
                raise IsplitError(f"cannot read image {path}: {exc}") from exc
        return torch.stack(images)

    def predict_tensor(self, x: torch.Tensor, top_k: int = 3) -> EdgePrediction:
        """Predict for preprocessed images ``(N, C, S, S)`` float32."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            code = self.head(x)
        t1 = time.perf_counter()
        payload = wire.encode(code, self.encoding)
        t2 = time.perf_counter()
        body = self._post(payload, top_k)
        t3 = time.perf_counter()
        return EdgePrediction(
            predictions=body["predictions"],
            head_ms=(t1 - t0) * 1e3,
            encode_ms=(t2 - t1) * 1e3,
            network_tail_ms=(t3 - t2) * 1e3,
            total_ms=(t3 - t0) * 1e3,
            bytes_sent=len(payload),
        )

    def predict_files(self, paths: list[Path], top_k: int = 3) -> EdgePrediction:
        t0 = time.perf_counter()
        x = self.preprocess(paths)
        out = self.predict_tensor(x, top_k)
        out.extra["preprocess_ms"] = (time.perf_counter() - t0) * 1e3 - out.total_ms
        return out

    def _post(self, payload: bytes, top_k: int) -> dict:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                r = self.session.post(
                    self.endpoint,
                    data=payload,
                    headers={"Content-Type": "application/octet-stream", "X-Isplit-Top-K": str(top_k)},
                    timeout=self.timeout_s,
                )
            except requests.RequestException as exc:  # network trouble: retry with back-off
                last = exc
                time.sleep(0.2 * 2**attempt)
                continue
            if r.status_code >= 500 and attempt < self.retries:
                last = IsplitError(f"tail answered {r.status_code}")
                time.sleep(0.2 * 2**attempt)
                continue
            if r.status_code != 200:
                raise IsplitError(f"tail at {self.endpoint} answered {r.status_code}: {r.text[:300]}")
            return r.json()
        raise IsplitError(f"tail at {self.endpoint} unreachable after {self.retries + 1} tries: {last}")


def _cmd_predict(args: argparse.Namespace) -> int:
    client = EdgeClient(Path(args.head), args.endpoint, encoding=args.encoding, timeout_s=args.timeout)
    paths = [Path(p) for p in args.images]
    out = client.predict_files(paths, top_k=args.top_k)
    agree = None
    if args.compare_local:
        from isplit.checkpoint import load_model

        full, _ = load_model(Path(args.compare_local))
        with torch.inference_mode():
            local = full(client.preprocess(paths)).argmax(1).tolist()
        agree = [p[0]["class"] == c for p, c in zip(out.predictions, local, strict=True)]
    for i, (path, preds) in enumerate(zip(paths, out.predictions, strict=True)):
        top = ", ".join(f"{p['name']} {p['probability']:.3f}" for p in preds)
        flag = "" if agree is None else ("  (full model agrees)" if agree[i] else "  (full model DISAGREES)")
        print(f"{path}: {top}{flag}")
    print(
        f"head {out.head_ms:.1f} ms | encode {out.encode_ms:.2f} ms ({args.encoding}) | sent {out.bytes_sent} B | "
        f"network+tail {out.network_tail_ms:.1f} ms | total {out.total_ms:.1f} ms"
    )
    if agree is not None:
        print(f"agreement with the full model: {sum(agree)}/{len(agree)}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="the edge client").add_subparsers(dest="edge_command", required=True)
    p = edge.add_parser("predict", help="run the head here, the tail on the server")
    p.add_argument("--head", required=True, help="head.pt exported by the trainer (head.json beside it)")
    p.add_argument("--endpoint", required=True, help="the tail's URL, e.g. http://127.0.0.1:8080/predictions/NAME")
    p.add_argument("--encoding", default="fp16", help=f"wire encoding: {', '.join(wire.ENCODINGS)}")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--compare-local", metavar="FULL_MODEL", help="also run this full checkpoint locally")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=_cmd_predict)
