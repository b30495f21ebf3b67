"""Analysis jobs against the local stack, as a user feels them: how long until a job shows
progress, is analysed, and its candidates are on Kafka.

First one job on an idle analyzer, then ``--jobs`` jobs submitted at once. Per job: POST ->
first progress (``images_done`` > 0), POST -> ``analysed`` (or later), POST -> first candidate
on the candidates topic (keyed by the job id); jobs per minute over the batch; ``/healthz``
latency (p50/p99) polled every 100 ms throughout. Needs the stack (``isplit up``) and a
checkpoint to upload (``--checkpoint``; e.g. the demo's reference model under var/models).
Prints a table; ``--json-out`` also writes the figures with the machine and its load average.

    .venv/bin/python benchmarks/bench_jobs.py --checkpoint var/models/<model>.pt --json-out benchmarks/results/jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.machine

from benchmarks.machine import describe, load_line  # noqa: E402
from isplit.auth import bearer  # noqa: E402
from isplit.bus import make_consumer  # noqa: E402
from isplit.dev.stack import analyzer_token  # noqa: E402
from isplit.settings import ServiceSettings  # noqa: E402

DONE = ("analysed", "succeeded", "failed", "cancelled")


class HealthProbe(threading.Thread):
    """GET ``/healthz`` every ``interval`` seconds; latencies in ms."""

    def __init__(self, base: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.base, self.interval, self.ms, self.errors = base, interval, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        with requests.Session() as s:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = s.get(self.base + "/healthz", timeout=5).status_code == 200
                except requests.RequestException:
                    ok = False
                self.ms.append((time.perf_counter() - t0) * 1e3)
                self.errors += not ok
                self.stop.wait(self.interval)


class CandidateWatch(threading.Thread):
    """Records when the first candidate of each job id appears on the candidates topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.first: dict[str, float] = {}
        self.stop = threading.Event()
        self.consumer = make_consumer(bootstrap, f"bench-jobs-{time.time_ns()}", [topic], auto_offset_reset="latest")
        while not self.consumer.assignment():  # joined: nothing published from now on is missed
            self.consumer.poll(timeout_ms=200)

    def run(self) -> None:
        while not self.stop.is_set():
            for records in self.consumer.poll(timeout_ms=200, max_records=100).values():
                for r in records:
                    self.first.setdefault(r.key, time.monotonic())
        self.consumer.close()


def submit(base: str, model_id: str, args: argparse.Namespace) -> tuple[str, float]:
    options = {"max_images": args.images, "top_k": 1, "epochs": 1, "max_train_images": 256, "max_test_images": 256}
    t0 = time.monotonic()
    r = requests.post(f"{base}/v1/analyses", headers=bearer(analyzer_token()), json={"model_id": model_id, "dataset": args.dataset, "options": options},
                      timeout=30)  # fmt: skip
    r.raise_for_status()
    return r.json()["id"], t0


def follow(base: str, jobs: dict[str, float], watch: CandidateWatch, timeout_s: float) -> dict[str, dict]:
    """Poll every job every 50 ms until analysed and its candidate is on Kafka."""
    out = {job: {"posted": t0} for job, t0 in jobs.items()}
    deadline = time.monotonic() + timeout_s
    with requests.Session() as s:
        s.headers.update(bearer(analyzer_token()))
        while time.monotonic() < deadline:
            pending = [j for j, o in out.items() if "analysed" not in o or ("candidate" not in o and "error" not in o)]
            if not pending:
                break
            for job in pending:
                o = out[job]
                view = s.get(f"{base}/v1/analyses/{job}", timeout=10).json()
                now = time.monotonic()
                if view["progress"]["images_done"] > 0:
                    o.setdefault("progress", now)
                if view["status"] in DONE:
                    o.setdefault("analysed", now)
                    if view["status"] in ("failed", "cancelled"):
                        o["error"] = view.get("error") or view["status"]
                if job in watch.first:
                    o["candidate"] = watch.first[job]
            time.sleep(0.05)
    return {
        job: {
            key: round(o[key] - o["posted"], 3) if key in o else None for key in ("progress", "analysed", "candidate")
        }
        | ({"error": o["error"]} if "error" in o else {})
        for job, o in out.items()
    }


def summarise(per_job: dict[str, dict]) -> dict:
    def med(key: str) -> float | None:
        values = [v[key] for v in per_job.values() if v[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {f"{k}_median_s": med(k) for k in ("progress", "analysed", "candidate")} | {
        f"{k}_max_s": max((v[k] for v in per_job.values() if v[k] is not None), default=None)
        for k in ("progress", "analysed", "candidate")
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--analyzer", default="http://127.0.0.1:8000")
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    machine = describe()
    base = args.analyzer
    settings = ServiceSettings()
    with open(args.checkpoint, "rb") as fh:
        model = requests.post(f"{base}/v1/models", files={"file": (args.checkpoint.name, fh)},
                              headers=bearer(analyzer_token()), timeout=120)  # fmt: skip
    model.raise_for_status()
    model_id = model.json()["model_id"]
    probe = HealthProbe(base)
    watch = CandidateWatch(settings.kafka_bootstrap, settings.topics().candidates)
    probe.start()
    watch.start()
    idle = follow(base, dict([submit(base, model_id, args)]), watch, args.timeout)
    t0 = time.monotonic()
    batch_jobs = dict(submit(base, model_id, args) for _ in range(args.jobs))
    batch = follow(base, batch_jobs, watch, args.timeout)
    batch_s = max(v["analysed"] or 0 for v in batch.values()) + min(batch_jobs.values()) - t0
    probe.stop.set()
    watch.stop.set()
    ms = sorted(probe.ms)
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine | {"load_average_end": [round(v, 2) for v in os.getloadavg()]},
        "idle": idle,
        "idle_summary": summarise(idle),
        "batch": batch,
        "batch_summary": summarise(batch) | {"jobs_per_minute": round(60 * args.jobs / batch_s, 2)},
        "healthz_ms": {
            "n": len(ms),
            "errors": probe.errors,
            "p50": round(ms[len(ms) // 2], 2),
            "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        },
    }
    print(f"analysis jobs of {args.images} images ({args.dataset}), seconds from POST:")
    print(f"{'':<28} {'first progress':>15} {'analysed':>9} {'candidate on Kafka':>19}")
    for label, s in (
        ("idle analyzer (1 job)", result["idle_summary"]),
        (f"{args.jobs} jobs at once, median", result["batch_summary"]),
    ):
        print(f"{label:<28} {s['progress_median_s']!s:>15} {s['analysed_median_s']!s:>9} {s['candidate_median_s']!s:>19}")  # fmt: skip
    b = result["batch_summary"]
    print(f"{args.jobs} jobs at once, max{'':<11} {b['progress_max_s']!s:>15} {b['analysed_max_s']!s:>9} {b['candidate_max_s']!s:>19}")  # fmt: skip
    print(f"jobs per minute: {b['jobs_per_minute']}; /healthz p50 {result['healthz_ms']['p50']} ms, "
          f"p99 {result['healthz_ms']['p99']} ms over {len(ms)} probes ({probe.errors} errors)")  # fmt: skip
    print(load_line(machine))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
