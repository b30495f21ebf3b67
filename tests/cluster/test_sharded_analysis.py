"""An analysis sharded as a real Kubernetes Indexed Job (the analyzer's kubernetes executor).

The skaffold release runs the inline executor; an analysis is computed inline first. Then the
release is upgraded (``helm upgrade --reuse-values``, the same images) to
``analyzer.executor=kubernetes`` with 2 shards: the same analysis becomes one batch/v1 Indexed
Job whose 2 pods compute their shards on the node and write their stats to the artifact volume;
the analyzer merges them, reports and publishes as before, and the result equals the inline
one. A cancelled sharded analysis loses its Job. The release is set back to inline at the end.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from isplit.analysis import AnalysisResult

from .conftest import NAMESPACE, RELEASE, ROOT, Deployment, record_timing, skaffold_env

OPTIONS = {"max_images": 120, "batch_size": 20, "top_k": 1, "epochs": 1, "max_train_images": 200}
SELECTOR = "app.kubernetes.io/component=analysis-job"


def _upgrade(d: Deployment, executor: str) -> None:
    c = d.cluster
    proc = subprocess.run(
        ["helm", "upgrade", RELEASE, str(ROOT / "charts" / "isplit"), "-n", NAMESPACE, "--reuse-values",
         "--set", f"analyzer.executor={executor}", "--set", "analyzer.kubernetesExecutor.shards=2",
         "--wait", "--timeout", "10m"],
        env=skaffold_env(c), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    c.kubectl("rollout", "status", f"deployment/{RELEASE}-analyzer", "-n", NAMESPACE, "--timeout=600s", timeout=660)
    c.wait("the analyzer to be ready", 300, lambda: _ready(d.analyzer_url))
    env = c.json("get", "configmap", f"{RELEASE}-analyzer", "-n", NAMESPACE)["data"]
    assert env["ISPLIT_ANALYZER_EXECUTOR"] == executor


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _finished(d: Deployment, job: str, seen: list[int]) -> dict | None:
    view = d.view(job)
    seen.append(view["progress"]["images_done"])
    assert view["status"] not in ("failed", "cancelled"), view.get("error")
    return view if view["status"] == "succeeded" else None


def _result(d: Deployment, job: str) -> AnalysisResult:
    return AnalysisResult.model_validate_json((d.artifact_dir / "analyses" / job / "result.json").read_bytes())


def _analysis_jobs(d: Deployment, analysis_id: str) -> list[dict]:
    items = d.cluster.json("get", "jobs", "-n", NAMESPACE, "-l", SELECTOR)["items"]
    return [j for j in items if j["metadata"]["annotations"].get("isplit.io/analysis-id") == analysis_id]


@pytest.fixture(scope="module")
def model_id(deployed: Deployment, digits_checkpoint: Path) -> str:
    with open(digits_checkpoint, "rb") as fh:
        r = requests.post(
            deployed.analyzer_url + "/v1/models", files={"file": ("m.pt", fh)}, headers=deployed.headers(), timeout=120
        )
    assert r.status_code in (200, 201), r.text
    return r.json()["model_id"]


@pytest.fixture(scope="module")
def inline_job(deployed: Deployment, model_id: str) -> str:
    d = deployed
    job = d.submit(model_id, OPTIONS)
    d.cluster.wait("the inline analysis", 600, lambda: _finished(d, job, []), 2)
    assert not _analysis_jobs(d, job), "the inline executor must not create Jobs"
    return job


@pytest.fixture(scope="module")
def sharded(deployed: Deployment, inline_job: str) -> Iterator[Deployment]:
    t0 = time.monotonic()
    _upgrade(deployed, "kubernetes")
    record_timing("analyzer_executor_switch_s", time.monotonic() - t0)
    try:
        yield deployed
    finally:
        _upgrade(deployed, "inline")


@pytest.fixture(scope="module")
def sharded_job(sharded: Deployment, model_id: str) -> tuple[str, list[int]]:
    d = sharded
    t0 = time.monotonic()
    job = d.submit(model_id, OPTIONS)
    seen: list[int] = []
    d.cluster.wait("the sharded analysis", 900, lambda: _finished(d, job, seen), 2)
    record_timing("sharded_analysis_s", time.monotonic() - t0)
    return job, seen


def test_a_sharded_analysis_is_one_indexed_job_of_two_pods(sharded, sharded_job):
    d = sharded
    job, _ = sharded_job
    jobs = _analysis_jobs(d, job)
    assert len(jobs) == 1
    spec, status = jobs[0]["spec"], jobs[0]["status"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert status.get("succeeded") == 2, status
    pods = d.cluster.json("get", "pods", "-n", NAMESPACE, "-l", f"job-name={jobs[0]['metadata']['name']}")["items"]
    done = [p for p in pods if p["status"]["phase"] == "Succeeded"]
    indices = sorted(int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]) for p in done)
    assert indices == [0, 1]
    for pod in done:
        assert pod["spec"]["nodeName"] == "isplit-node"  # the real node, not the kwok GPU node
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        log = d.cluster.kubectl("logs", pod["metadata"]["name"], "-n", NAMESPACE)
        assert f"shard {index} of 2: 60 images" in log, log  # it really computed its 60 images


def test_the_shards_stats_are_on_the_artifact_volume(sharded, sharded_job):
    job, _ = sharded_job
    shards = sharded.artifact_dir / "analyses" / job / "shards"
    assert sorted(p.name for p in shards.glob("*.npz")) == ["shard-0-of-2.npz", "shard-1-of-2.npz"]
    progress = [int(p.read_text()) for p in sorted(shards.glob("*.progress"))]
    assert progress == [60, 60]


def test_progress_is_the_sum_over_the_shards(sharded, sharded_job):
    job, seen = sharded_job
    view = sharded.view(job)
    assert view["progress"]["images_done"] == view["progress"]["images_total"] == 120
    assert seen == sorted(seen), "progress never goes back"


def test_the_sharded_result_equals_the_inline_result(sharded, sharded_job, inline_job):
    merged, inline = _result(sharded, sharded_job[0]), _result(sharded, inline_job)
    assert merged.curve.num_images == inline.curve.num_images == 120
    for a, b in zip(merged.curve.points, inline.curve.points, strict=True):
        assert a.module == b.module
        assert a.cui == pytest.approx(b.cui, rel=1e-4, abs=1e-30), a.module
    assert merged.curve.candidates == inline.curve.candidates
    assert merged.curve.best == inline.curve.best
    assert merged.ranking == inline.ranking


def test_the_sharded_analysis_publishes_its_candidates(sharded, sharded_job):
    view = sharded.view(sharded_job[0])
    assert view["status"] == "succeeded"
    assert view["candidates"] and all(c["published"] for c in view["candidates"])
    assert view["candidates"][0]["cut"] == view["result"]["ranking"][0]


def test_cancelling_a_sharded_analysis_deletes_its_job(sharded, model_id):
    d = sharded
    job = d.submit(model_id, {**OPTIONS, "max_images": 360, "batch_size": 1, "top_k": 0})
    d.cluster.wait("the analysis's Job", 300, lambda: _analysis_jobs(d, job), 2)
    r = requests.delete(f"{d.analyzer_url}/v1/analyses/{job}", headers=d.headers(), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    d.cluster.wait("the Job to be deleted", 120, lambda: not _analysis_jobs(d, job), 2)
