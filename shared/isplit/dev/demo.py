"""``isplit demo``: the product end to end, the way a user runs it, against the local stack.

Train (or reuse) a reference VGG16 variant on Fashion-MNIST, upload it, submit an analysis for
all classes and one for a class subset over HTTP, let the trainer retrain the top candidates,
call the best tail through TorchServe with the edge client on real test images, print a table
per candidate and write a Markdown report with the plots.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
import torch
from PIL import Image
from tqdm.auto import tqdm

from isplit import IsplitError
from isplit.dev.reference import cached_reference_model
from isplit.dev.stack import home


def _api(base: str, method: str, path: str, **kw) -> dict:
    r = requests.request(method, base + path, timeout=60, **kw)
    if r.status_code >= 400:
        raise IsplitError(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
    return r.json()


def reference_model(args: argparse.Namespace) -> Path:
    path = home() / "models" / f"{args.arch}-w{args.width}-fashion-mnist-{args.input_size}-{args.model_train_images}.pt"
    if path.exists():
        print(f"reusing reference model {path}")
        return path
    print(f"training reference model {path.name} (once; reused afterwards)")
    cached_reference_model(path, arch=args.arch, dataset="fashion-mnist", input_size=args.input_size,
                           width=args.width, epochs=args.model_epochs, lr=0.004,
                           max_train_images=args.model_train_images)  # fmt: skip
    print(f"wrote {path}")
    return path


def wait_analysis(base: str, job: str, label: str) -> dict:
    bar = tqdm(total=100, desc=f"analysis {label}", unit="%")
    while True:
        view = _api(base, "GET", f"/v1/analyses/{job}")
        bar.n = int(100 * view["progress"]["fraction"])
        bar.set_postfix(status=view["status"])
        bar.refresh()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            bar.close()
            if view["status"] != "succeeded":
                raise IsplitError(f"analysis {job} {view['status']}: {view['error']}")
            return view
        time.sleep(0.5)


def wait_training(base: str, jobs: list[str], timeout_s: float) -> dict[str, dict]:
    total = sum(len(_api(base, "GET", f"/v1/analyses/{j}")["candidates"]) for j in jobs)
    bar = tqdm(total=total, desc="trainer: candidates measured", unit="cand")
    deadline = time.monotonic() + timeout_s
    while True:
        views = {j: _api(base, "GET", f"/v1/analyses/{j}") for j in jobs}
        done = sum(1 for v in views.values() for c in v["candidates"] if c["measured"])
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            return views
        if time.monotonic() > deadline:
            bar.close()
            print(f"warning: only {done}/{total} candidates measured after {timeout_s:.0f} s")
            return views
        time.sleep(2)


def candidate_table(view: dict) -> list[str]:
    rows = ["| cut | CUI rank | size rank | log10 CUI | accuracy (split) | accuracy (original) | bytes/img fp16 | latency ms |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in view["candidates"]:
        m = c["measured"] or {}
        acc = m.get("accuracy_split_subset") or m.get("accuracy_split")
        orig = m.get("accuracy_original_subset") or m.get("accuracy_original")
        rows.append(
            f"| {c['cut']} | {c['predicted_rank']} | {c['size_rank']} | {c['log10_cui']:.2f} | "
            f"{_pct(acc)} | {_pct(orig)} | {m.get('bytes_per_image', {}).get('fp16', '-')} | "
            f"{m.get('latency_ms') and round(m['latency_ms'], 1) or '-'} |"
        )
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def edge_check(view: dict, checkpoint: Path, out: Path, n_images: int) -> list[str]:
    """Call the best measured tail through TorchServe with the edge client on real test images."""
    from isplit.checkpoint import load_model
    from isplit.data import load_dataset
    from isplit.edge import EdgeClient

    measured = [c for c in view["candidates"] if c["measured"] and c["measured"].get("inference_url")]
    if not measured:
        return ["(no tail was registered: see the trainer log)"]
    best = max(measured, key=lambda c: c["measured"]["accuracy_split"])
    m = best["measured"]
    head = home() / "artifacts" / m["head_uri"]
    test = load_dataset("fashion-mnist", "test").subset(None, n_images)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(test)):
        p = img_dir / f"test-{i:03d}-{test.class_names[int(test.labels[i])].replace('/', '_')}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(p)
        paths.append(p)
    client = EdgeClient(head, m["inference_url"], encoding="fp16")
    pred = client.predict_files(paths, top_k=1)
    full, _ = load_model(checkpoint)
    with torch.inference_mode():
        local = full(client.preprocess(paths)).argmax(1).tolist()
    split = [p[0]["class"] for p in pred.predictions]
    agree = sum(a == b for a, b in zip(split, local, strict=True))
    correct = sum(a == int(y) for a, y in zip(split, test.labels, strict=True))
    return [
        f"Best measured tail `{m['model_name']}` (cut `{best['cut']}`) called through TorchServe by the edge client "
        f"on {len(paths)} real Fashion-MNIST test images (fp16 on the wire):",
        "",
        f"* agreement with the full model: {agree}/{len(paths)}; correct: {correct}/{len(paths)}",
        f"* head {pred.head_ms:.1f} ms, encode {pred.encode_ms:.2f} ms, {pred.bytes_sent} bytes sent "
        f"({pred.bytes_sent / len(paths):.0f} per image vs {test.images[0].numel()} raw), "
        f"network+tail {pred.network_tail_ms:.1f} ms, total {pred.total_ms:.1f} ms for the batch",
    ]


def run(args: argparse.Namespace) -> int:
    from isplit.dev import stack

    base = args.analyzer
    if stack.status() != 0:
        stack.up()
    checkpoint = reference_model(args)
    with open(checkpoint, "rb") as fh:
        model = _api(base, "POST", "/v1/models", files={"file": (checkpoint.name, fh)})
    print(f"uploaded {model['arch']} as {model['model_id']} (test accuracy {_pct(model['test_accuracy'])})")
    options = {"max_images": args.analysis_images, "top_k": args.top_k, "epochs": args.bottleneck_epochs,
               "lr": 0.005, "max_train_images": args.train_images, "max_test_images": 2000}  # fmt: skip
    jobs = {
        "all classes": _api(base, "POST", "/v1/analyses", json={"model_id": model["model_id"], "dataset": "fashion-mnist", "options": options})["id"],
        f"subset {args.subset}": _api(
            base, "POST", "/v1/analyses",
            json={"model_id": model["model_id"], "dataset": "fashion-mnist", "classes": args.subset.split(","),
                  "options": {**options, "top_k": max(1, args.top_k - 1)}},
        )["id"],
    }  # fmt: skip
    views = {label: wait_analysis(base, job, label) for label, job in jobs.items()}
    for label, view in views.items():
        print(
            f"{label}: best cut {view['result']['best']}, candidates {', '.join(c['cut'] for c in view['candidates'])}"
        )
    print("waiting for the trainer to retrain and register the candidates' tails ...")
    measured = wait_training(base, list(jobs.values()), args.timeout)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = home() / "reports" / f"demo-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# isplit demo report ({stamp} UTC)", "", f"Model: `{model['arch']}` ({checkpoint.name}), "
             f"Fashion-MNIST, test accuracy {_pct(model['test_accuracy'])}.", ""]  # fmt: skip
    for label, job in jobs.items():
        view = measured[job]
        png = out / f"curve-{job}.png"
        png.write_bytes(requests.get(f"{base}/v1/analyses/{job}/plot.png", timeout=30).content)
        corr = view.get("correlation") or {}
        lines += [f"## {label} (analysis `{job}`)", "", f"Best cut by CUI: `{view['result']['best']}`; "
                  f"size baseline's pick: `{view['result']['size_ranking'][0]}`.", "", *candidate_table(view), "",
                  f"Spearman (measured accuracy vs CUI): {corr.get('spearman_cui')}; vs size: {corr.get('spearman_size')}",
                  "", f"![curve]({png.name})", ""]  # fmt: skip
    lines += ["## Edge client", "", *edge_check(measured[jobs["all classes"]], checkpoint, out, args.edge_images)]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"\nreport: {report}")
    json_path = out / "analyses.json"
    json_path.write_text(json.dumps(measured, indent=1, default=str))
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole product end to end against the local stack")
    p.add_argument("--analyzer", default="http://127.0.0.1:8000")
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--model-epochs", type=int, default=3)
    p.add_argument("--model-train-images", type=int, default=20000, help="reference model's training slice")
    p.add_argument("--analysis-images", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--bottleneck-epochs", type=int, default=1)
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--subset", default="sandal,sneaker,ankle-boot", help="comma-separated class names or indices")
    p.add_argument("--edge-images", type=int, default=16)
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the trainer")
    p.set_defaults(func=run)
