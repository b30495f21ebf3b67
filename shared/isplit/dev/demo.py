"""``isplit demo``: the product end to end, the way a user runs it, against the local stack.

Train (or reuse) a reference VGG16-BN ×0.25 on Fashion-MNIST (32 px, 3 epochs on 30,000 images:
90.7 % test accuracy in 93 s on 2 cores), upload it, submit an analysis for
all classes and one for a class subset over HTTP with a realistic deployment (``DEMO_DEPLOYMENT``:
a Raspberry-Pi-class device, a 10 Mbit/s LTE-class uplink, a GPU server, a head of at most half
the network's FLOPs), let the trainer retrain the best cuts that deployment can use, call the
recommended tail through TorchServe with the edge client on real test images and compare its
timing with the plan's estimate for this machine, print a table per candidate and write a
Markdown report with the plan tables and the plots. Each analysis is also saved as a folder
``isplit plan --analysis`` reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
import torch
from PIL import Image
from tqdm.auto import tqdm

from isplit import IsplitError
from isplit.auth import bearer
from isplit.dev.reference import cached_reference_model
from isplit.dev.stack import analyzer_token, home
from isplit.plan import (
    DEMO_DEPLOYMENT,
    DeploymentSpec,
    Plan,
    add_deployment_flags,
    measure_device,
    measured_from_results,
    plan_analysis,
    plan_table,
    resolve_deployment,
    spec_from_args,
)


def _api(base: str, method: str, path: str, **kw) -> dict:
    r = _call(base, method, path, **kw)
    if r.status_code >= 400:
        raise IsplitError(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
    return r.json()


def _call(base: str, method: str, path: str, **kw) -> requests.Response:
    """One API call with the local stack's token (``ISPLIT_ANALYZER_TOKEN`` or var/run/analyzer-token)."""
    return requests.request(method, base + path, timeout=60, headers=bearer(analyzer_token()), **kw)


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


def deployment_spec(args: argparse.Namespace) -> DeploymentSpec:
    """The demo's deployment: ``DEMO_DEPLOYMENT`` with the deployment flags given laid over it."""
    return DEMO_DEPLOYMENT.overlay(spec_from_args(args))


def save_analysis(job: str, view: dict, out: Path) -> Path:
    """The job's report as a folder ``isplit plan --analysis`` reads: ``result.json`` and the
    trainer's results (``measured.json``)."""
    folder = out / f"analysis-{job}"
    folder.mkdir(parents=True, exist_ok=True)
    # The local stack's analyzer keeps each report under <artifact root>/analyses/<id>.
    shutil.copy(home() / "artifacts" / "analyses" / job / "result.json", folder / "result.json")
    results = [c["measured"] for c in view["candidates"] if c["measured"]]
    (folder / "measured.json").write_text(json.dumps(results, indent=1))
    return folder


def plan_section(base: str, job: str, folder: Path, label: str) -> tuple[Plan, list[str]]:
    """The analyzer's plan for the job's deployment, as a report section with its plot."""
    from isplit.analysis import load_result
    from isplit.plots import plot_plan

    plan = Plan.model_validate(_api(base, "GET", f"/v1/analyses/{job}/plan"))
    png = plot_plan(plan, load_result(folder).curve, folder.parent / f"plan-{job}.png", title=label)
    lines = ["### Deployment plan", "", *[f"* {n}" for n in plan.notes], "", *plan_table(plan), "",
             f"![plan]({png.name})", "", f"Recompute it: `isplit plan --analysis {folder.name}` (flags as for the demo).",
             ""]  # fmt: skip
    return plan, lines


def plan_vs_client(
    checkpoint: Path, folder: Path, cut: str, measured: dict, client: object, x: torch.Tensor
) -> list[str]:
    """The edge client's timing for one image beside the plan's estimate for the same cut on
    this machine: its own measured device profile, the loopback link, TorchServe's latency."""
    from isplit.analysis import load_result
    from isplit.checkpoint import load_model
    from isplit.cuts import find_cut_points

    model, info = load_model(checkpoint)
    shape = (info.in_channels, info.input_size, info.input_size)
    profile = measure_device(model, shape, find_cut_points(model, shape), arch=info.arch, repeats=20)
    result = load_result(folder)
    spec = DeploymentSpec(device_profile=profile, link="loopback", use_registration_latency=True)
    est = plan_analysis(
        result, resolve_deployment(spec), measured_from_results([measured], subset=result.classes is not None)
    ).cut(cut)
    runs = [client.predict_tensor(x, top_k=1) for _ in range(11)][1:]  # type: ignore[attr-defined]
    med = {
        k: statistics.median(getattr(r, k) for r in runs)
        for k in ("head_ms", "encode_ms", "network_tail_ms", "total_ms")
    }
    return [
        "",
        f"Edge client vs plan for cut `{cut}` on this machine ({profile.machine}, {profile.torch_threads} threads; "
        f"plan: this machine's profile from `isplit edge profile`, loopback link, TorchServe's registration latency), "
        "one image, median of 10 calls:",
        "",
        "| step | edge client (measured) | plan (estimate) |",
        "|---|---|---|",
        f"| head (with the bottleneck encoder) | {med['head_ms']:.2f} ms | {est.head_ms:.2f} ms |",
        f"| encode (fp16) | {med['encode_ms']:.3f} ms | {est.encode_ms:.3f} ms |",
        f"| network + tail | {med['network_tail_ms']:.2f} ms | {est.transfer_ms + est.tail_ms + est.rtt_ms:.2f} ms |",
        f"| total | {med['total_ms']:.2f} ms | {est.latency_ms:.2f} ms |",
    ]


def edge_check(view: dict, checkpoint: Path, out: Path, n_images: int, plan: Plan, folder: Path) -> list[str]:
    """Call the recommended cut's tail (else the best measured one) through TorchServe with the
    edge client on real test images, and compare its timing with the plan's estimate."""
    from isplit.checkpoint import load_model
    from isplit.data import load_dataset
    from isplit.edge import EdgeClient
    from isplit.torchserve import read_keys

    measured = [c for c in view["candidates"] if c["measured"] and c["measured"].get("inference_url")]
    if not measured:
        return ["(no tail was registered: see the trainer log)"]
    chosen = [c for c in measured if c["cut"] == plan.recommended]
    best = chosen[0] if chosen else max(measured, key=lambda c: c["measured"]["accuracy_split"])
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
    keys = read_keys(home() / "torchserve" / "key_file.json")  # the stack's TorchServe
    client = EdgeClient(head, m["inference_url"], encoding="fp16", inference_key=keys.inference)
    pred = client.predict_files(paths, top_k=1)
    full, _ = load_model(checkpoint)
    with torch.inference_mode():
        local = full(client.preprocess(paths)).argmax(1).tolist()
    split = [p[0]["class"] for p in pred.predictions]
    agree = sum(a == b for a, b in zip(split, local, strict=True))
    correct = sum(a == int(y) for a, y in zip(split, test.labels, strict=True))
    which = "The recommended cut's" if chosen else "Best measured (the recommended cut has no tail)"
    comparison = plan_vs_client(checkpoint, folder, best["cut"], m, client, client.preprocess(paths[:1]))
    client.close()
    return [
        f"{which} tail `{m['model_name']}` (cut `{best['cut']}`) called through TorchServe by the edge client "
        f"on {len(paths)} real Fashion-MNIST test images (fp16 on the wire):",
        "",
        f"* agreement with the full model: {agree}/{len(paths)}; correct: {correct}/{len(paths)}",
        f"* head {pred.head_ms:.1f} ms, encode {pred.encode_ms:.2f} ms, {pred.bytes_sent} bytes sent "
        f"({pred.bytes_sent / len(paths):.0f} per image vs {test.images[0].numel()} raw), "
        f"network+tail {pred.network_tail_ms:.1f} ms, total {pred.total_ms:.1f} ms for the batch",
        *comparison,
    ]


def run(args: argparse.Namespace) -> int:
    from isplit.dev import stack

    base = args.analyzer
    if stack.status() != 0:
        stack.up()
    deployment = deployment_spec(args)  # checked before any work starts
    checkpoint = reference_model(args)
    with open(checkpoint, "rb") as fh:
        model = _api(base, "POST", "/v1/models", files={"file": (checkpoint.name, fh)})
    print(f"uploaded {model['arch']} as {model['model_id']} (test accuracy {_pct(model['test_accuracy'])})")
    options = {"max_images": args.analysis_images, "top_k": args.top_k, "epochs": args.bottleneck_epochs,
               "lr": 0.005, "max_train_images": args.train_images, "max_test_images": 2000}  # fmt: skip
    dep = deployment.model_dump(mode="json", exclude_none=True)
    print(f"deployment: {json.dumps(dep)} (presets are assumptions, not measurements)")
    jobs = {
        "all classes": _api(base, "POST", "/v1/analyses", json={"model_id": model["model_id"], "dataset": "fashion-mnist", "options": options, "deployment": dep})["id"],
        f"subset {args.subset}": _api(
            base, "POST", "/v1/analyses",
            json={"model_id": model["model_id"], "dataset": "fashion-mnist", "classes": args.subset.split(","),
                  "options": {**options, "top_k": max(1, args.top_k - 1)}, "deployment": dep},
        )["id"],
    }  # fmt: skip
    views = {label: wait_analysis(base, job, label) for label, job in jobs.items()}
    for label, view in views.items():
        print(
            f"{label}: best cut {view['result']['best']}; retraining for the deployment: "
            f"{', '.join(c['cut'] for c in view['candidates']) or '(no feasible cut)'}"
        )
    print("waiting for the trainer to retrain and register the candidates' tails ...")
    measured = wait_training(base, list(jobs.values()), args.timeout)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = home() / "reports" / f"demo-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# isplit demo report ({stamp} UTC)", "", f"Model: `{model['arch']}` ({checkpoint.name}), "
             f"Fashion-MNIST, test accuracy {_pct(model['test_accuracy'])}.", ""]  # fmt: skip
    plans: dict[str, tuple[Plan, Path]] = {}
    for label, job in jobs.items():
        view = measured[job]
        folder = save_analysis(job, view, out)
        plan, plan_lines = plan_section(base, job, folder, label)
        plans[job] = (plan, folder)
        png = out / f"curve-{job}.png"
        png.write_bytes(_call(base, "GET", f"/v1/analyses/{job}/plot.png").content)
        corr = view.get("correlation") or {}
        lines += [f"## {label} (analysis `{job}`)", "", f"Best cut by CUI: `{view['result']['best']}`; "
                  f"size baseline's pick: `{view['result']['size_ranking'][0]}`.", "", *candidate_table(view), "",
                  f"Spearman (measured accuracy vs CUI): {corr.get('spearman_cui')}; vs size: {corr.get('spearman_size')}",
                  "", f"![curve]({png.name})", "", *plan_lines]  # fmt: skip
    first = jobs["all classes"]
    lines += ["## Edge client", "", *edge_check(measured[first], checkpoint, out, args.edge_images, *plans[first])]
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
    p.add_argument("--arch", default="vgg16_bn")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--model-epochs", type=int, default=3)
    p.add_argument("--model-train-images", type=int, default=30000, help="reference model's training slice")
    p.add_argument("--analysis-images", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--bottleneck-epochs", type=int, default=1)
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--subset", default="sandal,sneaker,ankle-boot", help="comma-separated class names or indices")
    p.add_argument("--edge-images", type=int, default=16)
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the trainer")
    add_deployment_flags(p)  # over DEMO_DEPLOYMENT: rpi4, lte (10 Mbit/s), gpu, head <= half the FLOPs
    p.set_defaults(func=run)
