"""The analyzer's kubernetes executor: the Indexed Job it builds, validated strictly against the
Kubernetes schemas (kubernetes-validate), and its pods' entry point (``analyze-shard``) run here
as the Job's pods run it (``JOB_COMPLETION_INDEX`` set), merged into the inline result.
The real Job on a real cluster: tests/cluster/test_sharded_analysis.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes_validate import utils as kv
from pydantic import ValidationError

from isplit.analysis import result_from_stats, run_analysis
from isplit.checkpoint import sha256_file
from isplit.shards import load_stats, merge
from isplit_analyzer.config import Settings
from isplit_analyzer.executors import (
    ANALYSIS_JSON_ENV,
    AnalysisJobTemplate,
    analysis_compute,
    analysis_job_name,
    analyze_shard,
    shard_progress_path,
    shard_stats_path,
)
from isplit_analyzer.schemas import AcceptedAnalysis

K8S_VERSIONS = ("1.30.0", kv.latest_version())
MODEL_ID = "m-000000000001"


def template(**overrides) -> AnalysisJobTemplate:
    fields = {
        "image": "registry.example/isplit-analyzer:0.1.0",
        "namespace": "ml",
        "command": ["isplit-analyzer", "analyze-shard"],
        "env": {"ISPLIT_ARTIFACT_ROOT": "/var/lib/isplit/artifacts", "ISPLIT_ANALYZER_DEVICE": "cpu"},
        "artifact_claim": "isplit-artifacts",
        "service_account": "isplit-analysis-job",
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}},
        "backoff_limit": 2,
        "timeout_seconds": 900,
        "labels": {"app.kubernetes.io/instance": "isplit"},
        **overrides,
    }
    return AnalysisJobTemplate.model_validate(fields)


def gpu_template() -> AnalysisJobTemplate:
    return template(
        gpu_count=1,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env={"ISPLIT_ARTIFACT_ROOT": "/data", "ISPLIT_ANALYZER_DEVICE": "cuda"},
    )


def request(**overrides) -> AcceptedAnalysis:
    return AcceptedAnalysis.model_validate(
        {"model_id": MODEL_ID, "dataset": "digits", "weights_sha256": "0" * 64, **overrides}
    )


def build(t: AnalysisJobTemplate, shards: int = 3) -> dict:
    return t.build(analysis_id="a-0123456789ab", request_json=request().model_dump_json(), shards=shards)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("make", [template, gpu_template], ids=["cpu", "gpu"])
def test_indexed_job_validates_strictly_against_kubernetes_schema(make, version):
    assert kv.validate(build(make()), version, strict=True)


def test_one_analysis_is_one_indexed_job_with_a_pod_per_shard():
    job = build(template(), shards=3)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 900
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert AcceptedAnalysis.model_validate_json(env[ANALYSIS_JSON_ENV]) == request()
    assert env["ISPLIT_ANALYSIS_SHARDS"] == "3" and env["ISPLIT_ANALYSIS_ID"] == "a-0123456789ab"
    assert container["command"] == ["isplit-analyzer", "analyze-shard"]
    # a request error (exit 2) fails the Job at once; other failures are retried by backoffLimit
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    labels = spec["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "analysis-job"
    assert labels["isplit.io/analysis-id"] == "a-0123456789ab"


def test_gpu_analysis_jobs_limit_gpus_and_land_on_gpu_nodes():
    spec = build(gpu_template())["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["automountServiceAccountToken"] is False


def test_the_job_name_is_stable_short_and_leaves_room_for_the_pod_index():
    name = analysis_job_name("a-0123456789ab")
    assert name == analysis_job_name("a-0123456789ab") == build(template())["metadata"]["name"]
    assert name.startswith("isplit-analyze-a-0123456789ab")
    assert len(analysis_job_name("a-" + "x" * 100)) <= 52


def test_kubernetes_executor_needs_a_job_template():
    with pytest.raises(ValidationError, match="ISPLIT_ANALYZER_JOB_TEMPLATE"):
        Settings(analyzer_executor="kubernetes")
    assert analysis_compute(Settings()) is None
    compute = analysis_compute(Settings(analyzer_executor="kubernetes", analyzer_shards=3,
                                        analyzer_job_template=template().model_dump_json()))  # fmt: skip
    assert compute is not None and compute.shards == 3


def _pod_env(monkeypatch, root: Path, req: AcceptedAnalysis, index: int, shards: int) -> Settings:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
    monkeypatch.setenv("ISPLIT_ANALYSIS_SHARDS", str(shards))
    monkeypatch.setenv("ISPLIT_ANALYSIS_ID", "a-0123456789ab")
    monkeypatch.setenv(ANALYSIS_JSON_ENV, req.model_dump_json())
    return Settings(artifact_root=root, analyzer_device="cpu")


def test_shard_pods_write_stats_that_merge_into_the_inline_result(artifact_root, monkeypatch):
    weights = artifact_root / "models" / f"{MODEL_ID}.pt"
    req = request(weights_sha256=sha256_file(weights), options={"max_images": 96, "batch_size": 16})
    for index in range(2):
        assert analyze_shard(_pod_env(monkeypatch, artifact_root, req, index, 2)) == 0
    paths = [shard_stats_path(artifact_root, "a-0123456789ab", i, 2) for i in range(2)]
    progress = [int(shard_progress_path(artifact_root, "a-0123456789ab", i, 2).read_text()) for i in range(2)]
    assert sum(progress) == 96
    merged = result_from_stats(merge([load_stats(p) for p in paths]))
    inline = run_analysis(weights, "digits", max_images=96, batch_size=16, device="cpu")
    assert merged.curve.best == inline.curve.best and merged.curve.candidates == inline.curve.candidates
    for a, b in zip(merged.curve.points, inline.curve.points, strict=True):
        assert a.cui == pytest.approx(b.cui, rel=1e-4, abs=1e-30)


def test_a_shard_pod_exits_2_for_a_request_it_cannot_analyse(artifact_root, monkeypatch, capsys):
    req = request(options={"max_images": 3})
    assert analyze_shard(_pod_env(monkeypatch, artifact_root, req, 0, 4)) == 2
    assert "4 shards for 3 images" in capsys.readouterr().err
    monkeypatch.setenv(ANALYSIS_JSON_ENV, json.dumps({"model_id": "nope"}))
    assert analyze_shard(Settings(artifact_root=artifact_root)) == 2
