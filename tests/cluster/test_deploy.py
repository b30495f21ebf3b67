"""isplit deployed by ``skaffold run -p local``, exercised end to end against the cluster.

A model is uploaded and an analysis submitted to the analyzer's Service (NodePort); the
trainer consumes the candidate from the cluster's Kafka with the kubernetes executor, so the
candidate trains in a real batch/v1 Job pod that writes to the shared artifact volume; the tail
is registered with the TorchServe pod; the edge client's predictions through the TorchServe
Service equal the local head+tail; Prometheus (kubernetes_sd against the API server) holds
isplit_ series of all three components and every dashboard query returns data; deleting the
trainer pod while its candidate trains still yields exactly one result.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import torch
from kafka import KafkaConsumer, TopicPartition

from isplit import wire
from isplit.messages import TOPIC_RESULTS
from tests.fixtures.stack import digits_test_pngs
from tests.promql import from_grafana

from .conftest import NAMESPACE, RELEASE, Deployment, record_timing

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "isplit" / "dashboards"
OPTIONS = {"max_images": 120, "top_k": 1, "epochs": 2, "lr": 0.005, "max_train_images": 400}


def _measured(d: Deployment, job: str):
    view = d.view(job)
    assert view["status"] != "failed", view.get("error")
    if view["candidates"] and all(c["measured"] for c in view["candidates"]):
        return view
    return None


def _training_jobs(d: Deployment) -> list[dict]:
    return d.cluster.json("get", "jobs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=training-job")["items"]


@dataclass
class ClusterFlow:
    model_id: str
    analysis: dict
    candidate: dict
    edge_classes: list[int]
    local_split_classes: list[int]
    job_pods: list[dict]
    code: torch.Tensor  # one image's head output, a valid tail input


@pytest.fixture(scope="module")
def model_id(deployed: Deployment, digits_checkpoint: Path) -> str:
    with open(digits_checkpoint, "rb") as fh:
        r = requests.post(deployed.analyzer_url + "/v1/models", files={"file": ("m.pt", fh)},
                          headers=deployed.headers(), timeout=120)  # fmt: skip
    assert r.status_code in (200, 201), r.text
    anonymous = requests.get(deployed.analyzer_url + "/v1/analyses", timeout=10)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    return r.json()["model_id"]


@pytest.fixture(scope="module")
def flow(deployed: Deployment, model_id: str, tmp_path_factory: pytest.TempPathFactory) -> ClusterFlow:
    from isplit.edge import EdgeClient

    d = deployed
    t0 = time.monotonic()
    job = d.submit(model_id, OPTIONS)
    view = d.cluster.wait("the candidate to be trained in a Job and measured", 1200, lambda: _measured(d, job), 3)
    record_timing("analysis_to_measured_s", time.monotonic() - t0)
    candidate = view["candidates"][0]
    measured = candidate["measured"]
    assert measured["status"] == "succeeded", measured.get("error")
    pods = d.cluster.json("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=training-job")["items"]
    # The edge: real digits test images as PNG files, the exported head from the artifact
    # volume, the tail through the TorchServe Service's NodePort.
    _, paths = digits_test_pngs(tmp_path_factory.mktemp("cluster-edge"))
    head_path = d.artifact_dir / measured["head_uri"]
    endpoint = d.inference_base + urlsplit(measured["inference_url"]).path
    client = EdgeClient(head_path, endpoint, encoding="fp32", inference_key=d.tail_keys["inference-key"])
    pred = client.predict_files(paths, top_k=1)
    x = client.preprocess(paths)
    tail = torch.jit.load(str(head_path.parent / "tail.pt"))
    with torch.inference_mode():
        code = client.head(x)
        local_split = tail(code).argmax(1).tolist()
    edge = [p[0]["class"] for p in pred.predictions]
    return ClusterFlow(model_id, view, candidate, edge, local_split, pods, code[:1].clone())


def test_services_run_as_their_non_root_users_in_the_restricted_namespace(deployed):
    ns = deployed.cluster.json("get", "namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = deployed.cluster.json("get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")
    running = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in pods["items"]
               if p["status"]["phase"] == "Running"}  # fmt: skip
    assert {"analyzer", "trainer", "tail-serving"} <= set(running)
    for pod in running.values():
        image = pod["spec"]["containers"][0]["image"]
        assert image.startswith(deployed.cluster.registry + "/") and "@sha256:" in image, image
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_candidate_trains_in_a_kubernetes_job_pod(flow):
    assert flow.job_pods, "no training-job pod: the kubernetes executor did not run"
    pod = flow.job_pods[0]
    assert pod["spec"]["nodeName"] == "isplit-node"
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["metadata"]["annotations"]["isplit.io/candidate-id"] == flow.candidate["candidate_id"]


def test_the_tail_is_registered_with_the_torchserve_pod(deployed, flow):
    name = flow.candidate["measured"]["model_name"]
    r = requests.get(
        f"{deployed.management_url}/models/{name}", headers=deployed.tail_headers("management"), timeout=10
    )
    assert r.status_code == 200, r.text
    assert r.json()[0]["workers"], r.json()


def test_the_tail_serving_gateway_lets_in_only_the_release_keys(deployed, flow):
    """TorchServe's token authorization is on behind the gateway: no key, a wrong key or the
    other API's key is a 401 on both ports; /ping is open for probes."""
    name = flow.candidate["measured"]["model_name"]
    endpoint = deployed.inference_base + urlsplit(flow.candidate["measured"]["inference_url"]).path
    payload = wire.encode(flow.code, "fp32")
    for headers in ({}, {"Authorization": "Bearer wrong"}, deployed.tail_headers("management")):
        assert requests.post(endpoint, data=payload, headers=headers, timeout=30).status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, deployed.tail_headers("inference")):
        r = requests.get(f"{deployed.management_url}/models/{name}", headers=headers, timeout=10)
        assert r.status_code == 401, r.text
    assert requests.post(endpoint, data=payload, headers=deployed.tail_headers("inference"), timeout=30).ok
    assert requests.get(deployed.inference_base + "/ping", timeout=10).json()["status"] == "Healthy"


def test_edge_predictions_through_the_torchserve_service_equal_the_local_split_model(flow):
    assert flow.edge_classes == flow.local_split_classes


def test_measured_accuracy_is_attached_to_the_analysis(flow):
    measured = flow.candidate["measured"]
    assert measured["accuracy_original"] > 0.7
    assert 0 < measured["bytes_per_image"]["fp16"] < flow.candidate["output_bytes"]


def _exercise_error_paths(d: Deployment, flow: ClusterFlow) -> None:
    """A malformed payload (400 from the handler) and a model without workers (503): the
    tail-serving dashboard's 4xx and 5xx panels have data; workers are restored after."""

    measured = flow.candidate["measured"]
    endpoint = d.inference_base + urlsplit(measured["inference_url"]).path
    inference, management = d.tail_headers("inference"), d.tail_headers("management")
    assert requests.post(endpoint, data=b"not a tensor", headers=inference, timeout=30).status_code == 400
    mgmt = f"{d.management_url}/models/{measured['model_name']}"
    scale = {"synchronous": "true"}
    requests.put(mgmt, params={**scale, "min_worker": 0, "max_worker": 0}, headers=management, timeout=60)
    try:
        payload = wire.encode(flow.code, "fp32")
        assert requests.post(endpoint, data=payload, headers=inference, timeout=30).status_code == 503
    finally:
        requests.put(mgmt, params={**scale, "min_worker": 1, "max_worker": 1}, headers=management, timeout=120)


def test_prometheus_scrapes_isplit_series_from_the_three_pods(deployed, flow):
    c = deployed.cluster

    def components():
        result = c.prometheus_query(f'count by (component) ({{__name__=~"isplit_.+", namespace="{NAMESPACE}"}})')
        return {r["metric"].get("component") for r in result} >= {"analyzer", "trainer", "tail-serving"}

    c.wait("isplit_ series from the analyzer, trainer and TorchServe pods", 120, components, 3)


def test_every_dashboard_query_returns_data(deployed, flow):
    c = deployed.cluster
    _exercise_error_paths(deployed, flow)
    queries = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    key = f"{path.stem}: {panel['title']} [{target.get('refId', '')}]"
                    expr = re.sub(r"\$\{?namespace\}?", NAMESPACE, target["expr"])  # the panel's variable
                    queries[key] = from_grafana(expr)
    assert queries

    def empty():
        return [k for k, q in queries.items() if not c.prometheus_query(q)]

    deadline = time.monotonic() + 180
    missing = empty()
    while missing and time.monotonic() < deadline:
        time.sleep(5)
        missing = empty()
    assert not missing, "dashboard queries without data:\n" + "\n".join(f"{k}: {queries[k]}" for k in missing)


def _results_for(d: Deployment, candidate_id: str, topic: str) -> list[dict]:
    consumer = KafkaConsumer(bootstrap_servers=d.cluster.kafka, enable_auto_commit=False,
                             consumer_timeout_ms=3000, group_id=None)  # fmt: skip
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        found = []
        for record in consumer:
            try:
                value = json.loads(record.value)
            except (ValueError, TypeError):
                continue
            if value.get("candidate_id") == candidate_id:
                found.append(value)
        return found
    finally:
        consumer.close()


def test_deleting_the_trainer_pod_mid_candidate_still_yields_exactly_one_result(deployed, model_id, flow):
    d = deployed
    c = d.cluster
    before = {j["metadata"]["name"] for j in _training_jobs(d)}
    job = d.submit(model_id, {**OPTIONS, "epochs": 3})
    new_job = c.wait("a training Job for the new candidate", 300,
                     lambda: [j for j in _training_jobs(d) if j["metadata"]["name"] not in before], 2)[0]  # fmt: skip
    candidate_id = new_job["metadata"]["annotations"]["isplit.io/candidate-id"]
    trainer = c.json("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=trainer")["items"]
    assert len(trainer) == 1
    old = trainer[0]["metadata"]["name"]
    c.kubectl("delete", "pod", old, "-n", NAMESPACE, "--wait=true", timeout=180)
    view = c.wait("the candidate's result after the trainer pod was replaced", 1200, lambda: _measured(d, job), 3)
    assert view["candidates"][0]["measured"]["status"] == "succeeded"
    pods = c.json("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=trainer")["items"]
    assert old not in {p["metadata"]["name"] for p in pods}
    time.sleep(5)  # a duplicate would follow within the trainer's publish retry
    results = _results_for(d, candidate_id, TOPIC_RESULTS)
    assert len(results) == 1, f"{len(results)} results for {candidate_id}"
    assert len([j for j in _training_jobs(d) if j["metadata"]["name"] == new_job["metadata"]["name"]]) == 1
