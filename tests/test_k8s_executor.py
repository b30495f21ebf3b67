"""The trainer's Kubernetes executor: Job manifests validated strictly against the Kubernetes
schemas (kubernetes-validate), Job names and labels, and how a Job's status reads as an outcome.
No API server is involved."""

from __future__ import annotations

import json
import re

import pytest
from kubernetes_validate import utils as kv
from pydantic import ValidationError

from isplit_trainer.k8s_executor import (
    CANDIDATE_ID_LABEL,
    JobTemplate,
    build_job,
    job_name,
    job_outcome,
    label_value,
)

K8S_VERSIONS = ("1.30.0", kv.latest_version())
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CANDIDATE = {"schema_version": 1, "analysis_id": "a1b2", "candidate_id": "a1b2-layer3_1", "cut": "layer3.1"}


def make_job(**overrides):
    arguments = {
        "candidate_id": "a1b2-layer3_1",
        "analysis_id": "a1b2",
        "candidate_json": json.dumps(CANDIDATE),
        "image": "registry.example/isplit-trainer:0.1.0",
        "namespace": "ml",
        "command": ["isplit-trainer", "train-candidate"],
        "env": {"ISPLIT_ARTIFACT_ROOT": "/var/lib/isplit/artifacts", "ISPLIT_TRAINER_DEVICE": "cpu"},
        "gpu_count": 0,
        "node_selector": {},
        "tolerations": [],
        "artifact_claim": "isplit-artifacts",
        "service_account": "isplit-training-job",
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
    }
    arguments.update(overrides)
    return build_job(**arguments)


def gpu_job():
    return make_job(
        gpu_count=2,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env={"ISPLIT_ARTIFACT_ROOT": "/data/artifacts", "ISPLIT_TRAINER_DEVICE": "cuda"},
    )


def container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("build", [make_job, gpu_job], ids=["cpu", "gpu"])
def test_job_validates_strictly_against_kubernetes_schema(build, version):
    assert kv.validate(build(), version, strict=True)


def test_strict_validation_catches_a_misspelt_field():
    job = make_job()
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kv.ValidationError):
        kv.validate(job, "1.30.0", strict=True)


def test_cpu_job_requests_no_gpu():
    job = make_job()
    assert "nvidia.com/gpu" not in json.dumps(job)
    assert "nodeSelector" not in job["spec"]["template"]["spec"]


def test_gpu_job_limits_gpus_and_lands_on_gpu_nodes():
    job = gpu_job()
    spec = job["spec"]["template"]["spec"]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in container(job)["resources"]["requests"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_gpu_limit_does_not_change_the_callers_resources():
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    make_job(resources=resources, gpu_count=1)
    assert resources == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}


def test_candidate_reaches_the_container_as_environment():
    env = {item["name"]: item["value"] for item in container(make_job())["env"]}
    assert json.loads(env["ISPLIT_CANDIDATE_JSON"]) == CANDIDATE
    assert env["ISPLIT_CANDIDATE_ID"] == "a1b2-layer3_1"
    assert env["ISPLIT_ANALYSIS_ID"] == "a1b2"
    assert env["ISPLIT_TRAINER_DEVICE"] == "cpu"
    names = [item["name"] for item in container(make_job())["env"]]
    assert len(names) == len(set(names))


def test_artifact_claim_is_mounted_at_the_artifact_root():
    job = gpu_job()
    spec = job["spec"]["template"]["spec"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "isplit-artifacts"}} in spec["volumes"]
    assert {"name": "artifacts", "mountPath": "/data/artifacts"} in container(job)["volumeMounts"]
    env = {item["name"]: item["value"] for item in container(job)["env"]}
    assert env["ISPLIT_ARTIFACT_ROOT"] == "/data/artifacts"


def test_pod_meets_pod_security_restricted():
    spec = make_job()["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    security = spec["containers"][0]["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    assert mounts["/tmp"] in empty_dirs and mounts["/dev/shm"] in empty_dirs


def test_job_carries_owner_labels_on_job_and_pod():
    job = make_job(labels={"app.kubernetes.io/instance": "isplit"})
    for metadata in (job["metadata"], job["spec"]["template"]["metadata"]):
        labels = metadata["labels"]
        assert labels["app.kubernetes.io/name"] == "isplit"
        assert labels["app.kubernetes.io/instance"] == "isplit"
        assert labels["app.kubernetes.io/component"] == "training-job"
        assert labels["app.kubernetes.io/managed-by"] == "isplit-trainer"
        assert labels[CANDIDATE_ID_LABEL] == "a1b2-layer3_1"
        assert metadata["annotations"][CANDIDATE_ID_LABEL] == "a1b2-layer3_1"
    assert job["metadata"]["labels"] is not job["spec"]["template"]["metadata"]["labels"]


def test_job_lifetime_settings_are_passed_through():
    spec = make_job(ttl_seconds_after_finished=120, backoff_limit=0, active_deadline_seconds=900)["spec"]
    assert spec["ttlSecondsAfterFinished"] == 120
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 900


@pytest.mark.parametrize(
    "candidate_id",
    [
        "a1b2-layer3_1",
        "A" * 128,
        "Analysis_42-features_10_conv_" + "x" * 90,
        "___",
        "résumé.layer/1",
    ],
)
def test_job_name_is_a_dns_label_of_at_most_63_chars(candidate_id):
    name = job_name(candidate_id)
    assert len(name) <= 63
    assert DNS_1123_LABEL.match(name), name
    assert name.startswith("isplit-train-")
    assert name == job_name(candidate_id), "the same candidate must always get the same Job"
    assert make_job(candidate_id=candidate_id)["metadata"]["name"] == name


def test_job_names_keep_candidates_that_slug_alike_apart():
    assert job_name("A_1") != job_name("a-1")
    long_a, long_b = "x" * 100 + "a", "x" * 100 + "b"
    assert job_name(long_a) != job_name(long_b)


@pytest.mark.parametrize("value", ["a1b2-layer3_1", "x" * 128, "_bad_start", "a/b", "é"])
def test_label_values_stay_valid(value):
    assert LABEL_VALUE.match(label_value(value)) and len(label_value(value)) <= 63
    job = make_job(candidate_id=value, analysis_id=value)
    assert kv.validate(job, "1.30.0", strict=True)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="gpu_count"):
        make_job(gpu_count=-1)
    with pytest.raises(ValueError, match="candidate_id"):
        make_job(candidate_id="")
    with pytest.raises(ValueError, match="artifact_claim"):
        make_job(artifact_claim="")


def test_job_template_parses_the_chart_json_and_builds_jobs():
    template = JobTemplate.from_json(
        json.dumps(
            {
                "image": "isplit-trainer:0.1.0-cuda",
                "namespace": "ml",
                "command": ["isplit-trainer", "train-candidate"],
                "env": {"ISPLIT_ARTIFACT_ROOT": "/var/lib/isplit/artifacts"},
                "gpu_count": 1,
                "node_selector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [],
                "artifact_claim": "isplit-artifacts",
                "service_account": "isplit-training-job",
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                "ttl_seconds_after_finished": 60,
                "backoff_limit": 2,
                "labels": {"app.kubernetes.io/instance": "isplit"},
                "timeout_seconds": 600,
            }
        )
    )
    job = template.build(candidate_id="a1b2-conv1", analysis_id="a1b2", candidate_json="{}")
    assert kv.validate(job, "1.30.0", strict=True)
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_job_template_rejects_unknown_fields():
    with pytest.raises(ValidationError, match="gpus"):
        JobTemplate.from_json(
            json.dumps(
                {
                    "image": "i",
                    "namespace": "n",
                    "command": ["c"],
                    "artifact_claim": "a",
                    "service_account": "s",
                    "gpus": 1,
                }
            )
        )


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([], None),
        ([{"type": "Suspended", "status": "True"}], None),
        ([{"type": "Complete", "status": "False"}], None),
        ([{"type": "Complete", "status": "True", "reason": "Completed"}], ("succeeded", "Completed")),
        (
            [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"}],
            ("succeeded", "CompletionsReached"),
        ),
        (
            [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
            ("failed", "BackoffLimitExceeded"),
        ),
        ([{"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}], ("failed", "DeadlineExceeded")),
    ],
)
def test_job_status_reads_as_an_outcome(conditions, expected):
    outcome = job_outcome({"metadata": {"name": "isplit-train-x"}, "status": {"conditions": conditions}})
    if expected is None:
        assert outcome is None
    else:
        assert (outcome.status, outcome.reason) == expected
        assert outcome.job_name == "isplit-train-x"
        assert outcome.succeeded is (expected[0] == "succeeded")


def test_job_without_status_is_still_running():
    assert job_outcome({"metadata": {"name": "isplit-train-x"}}) is None
