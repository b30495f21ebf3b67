"""The benchmark's command line and its main measurements (agreement, latency, head to head)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.machine import describe
from isplit import torchserve as ts
from isplit import wire
from isplit.data import ImageSet, load_dataset, to_model_input
from isplit.export import export_pair
from isplit.messages import BottleneckSpec
from isplit.retrain import retrain_split

from .load import load_test, measure, served_top1
from .models import export_full_image, plain_split, reference_model, resnet_reference
from .report import goals, print_report
from .results import ENCODINGS, REPO, Report, log, median_ms
from .servers import (
    Server,
    fastapi_endpoint,
    load_handler,
    measure_batched,
    private_torchserve,
    run_fastapi,
    serve,
    time_in_process,
)
from .side_by_side import TailCase, alternating_rounds, side_by_side
from .tuning import tuning_experiments


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
    p.add_argument("--concurrency", default="1,8,16,32", help="client threads, comma-separated")
    p.add_argument("--batch-size", type=int, default=16, help="TorchServe server-side batch size")
    p.add_argument(
        "--batch-delays",
        default="0,1,5",
        help="side by side: a batched TorchServe registration per max batch delay (ms), comma-separated",
    )
    p.add_argument("--resnet-cut", default="layer3", help="side by side: the ResNet-18 tail's cut ('' = no ResNet)")
    p.add_argument("--resnet-train-images", type=int, default=3000, help="the ResNet-18 is trained 1 epoch on these")
    p.add_argument(
        "--resnet-requests",
        type=int,
        default=150,
        help="side by side: timed requests per ResNet cell (x concurrency/8 from 16 up), and its warm-up",
    )
    p.add_argument(
        "--side-by-side-only",
        action="store_true",
        help="only the side by side of both tails (no agreement, latency table, head to head or tuning)",
    )
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
    for flag in ("concurrency", "batch_delays"):
        value = getattr(args, flag)
        if not all(v.strip().isdigit() for v in value.split(",")):
            p.error(f"--{flag.replace('_', '-')} must be comma-separated whole numbers, got {value!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the client side: one image at a time, and two cores shared with servers
    if args.serve_fastapi:
        run_fastapi(args.serve_fastapi, args.port)
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report = Report(machine=describe(), model={})

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

    cases = [TailCase(f"{info.arch} {args.cut} (tiny tail)", "bench-tail", export / "pair", tail_mar, payloads["fp16"],
                      args.requests, args.warmup)]  # fmt: skip
    if args.resnet_cut:
        case, report.model["resnet"] = resnet_case(args, test, export)
        cases.append(case)
    reuse = args.inference_url is not None
    if not args.side_by_side_only:
        main_measurements(args, report, tail_mar, full_mar, export / "pair", full_dir, codes, pixels, payloads, test,
                          full_top1, split_fp32_top1)  # fmt: skip
    if not reuse:
        report.side_by_side = side_by_side(cases, args)
    if not (args.no_tuning or args.side_by_side_only or reuse):
        report.tuning = tuning_experiments(tail_mar, payloads["fp16"], args)
    report.machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    report.goals = goals(report)
    print_report(report)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(asdict(report), indent=1))
    failed = (
        sum(r.errors for r in report.latency)
        + sum(t.get("errors", 0) for t in report.tuning)
        + sum(c["errors"] for row in report.side_by_side for by_c in row["servers"].values() for c in by_c.values())
    )
    return 1 if failed else 0


def resnet_case(args: argparse.Namespace, test: ImageSet, export: Path) -> tuple[TailCase, dict]:
    """The ResNet-18 (64 px) cut at ``--resnet-cut`` without a bottleneck, exported and archived,
    its payloads the codes of the first 64 test images; and what the report says of the model."""
    model, info, checkpoint = resnet_reference(args)
    pair = plain_split(model, info, args.resnet_cut)
    files = export_pair(pair, info, export / "resnet", {"model_name": "bench-resnet", "dataset": "fashion-mnist"})
    mar = ts.build_mar(files["tail.pt"], files["tail.json"], "bench-resnet", "1.0", export / "mars")
    with torch.inference_mode():
        codes = pair.head(to_model_input(test.images[:64], info.input_size, info.mean, info.std))
    case = TailCase(f"resnet18 {args.resnet_cut} (64 px)", "bench-resnet", export / "resnet", mar,
                    [wire.encode(codes[i : i + 1], "fp16") for i in range(len(codes))], args.resnet_requests,
                    args.resnet_requests)  # fmt: skip
    about = {"checkpoint": str(checkpoint), "arch": info.arch, "input_size": info.input_size,
             "cut": args.resnet_cut, "code_shape": pair.code_shape, "train_images": args.resnet_train_images,
             "epochs": 1, "test_accuracy_first_2000": info.test_accuracy}  # fmt: skip
    return case, about


def main_measurements(args, report, tail_mar, full_mar, pair_dir, full_dir, codes, pixels, payloads, test,
                      full_top1, split_fp32_top1) -> None:  # fmt: skip
    """Agreement on the test set, the single-pass latency table and the head to head, on one
    TorchServe (the benchmark's own, or the one given) and bare endpoints for the tail and the
    full-image model."""
    reuse = args.inference_url is not None
    concurrency = [int(c) for c in args.concurrency.split(",")]
    main_server = (
        nullcontext(Server(args.inference_url, args.management_url, args.model_store, args.metrics_url))
        if reuse
        else private_torchserve({}, {})
    )
    tag = f"-{os.getpid()}"
    tail_name, batched_name, full_name = f"bench-tail{tag}", f"bench-tail-batched{tag}", f"bench-full{tag}"
    with (
        main_server as server,
        fastapi_endpoint(pair_dir, "fastapi-tail") as fastapi_url,
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


def head_to_head(server: Server, endpoints: list[tuple], args: argparse.Namespace) -> dict:
    """fp16 at concurrency 1 and 16 on each endpoint in turn, for ``args.rounds`` rounds
    (:func:`alternating_rounds`); the medians over rounds.

    ``endpoints`` holds ``(label, TorchServe model name or None, URL, payloads)``."""
    cells = alternating_rounds(server, endpoints, (1, 16), args.requests, args.rounds)
    out: dict = {"rounds": args.rounds, "endpoints": {}}
    for label, by_c in cells.items():
        c1, c16 = by_c["1"], by_c["16"]
        out["endpoints"][label] = {"c1_p50_ms": c1["p50_ms"], "c1_rps": c1["rps"], "c16_p50_ms": c16["p50_ms"],
                                   "c16_rps": c16["rps"], "c16_mean_batch": c16["mean_batch"]}  # fmt: skip
    return out
