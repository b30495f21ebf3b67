"""The whole pipeline at small scale: HTTP analysis -> Kafka -> trainer -> TorchServe -> edge."""

from __future__ import annotations

import time

import pytest
import requests

pytestmark = [pytest.mark.kafka, pytest.mark.torchserve, pytest.mark.slow]


def test_analysis_publishes_a_candidate_that_is_trained_and_measured(e2e_flow):
    cand = e2e_flow.candidate
    assert cand["published"] and cand["predicted_rank"] == 1
    assert cand["cut"] == e2e_flow.analysis["result"]["ranking"][0]
    measured = cand["measured"]
    assert measured["accuracy_original"] > 0.7
    assert 0 < measured["bytes_per_image"]["fp16"] < cand["output_bytes"]


def test_edge_prediction_through_torchserve_equals_the_local_split_model(e2e_flow):
    assert e2e_flow.edge_classes == e2e_flow.local_split_classes


def test_split_model_mostly_agrees_with_the_full_model(e2e_flow):
    agree = sum(a == b for a, b in zip(e2e_flow.edge_classes, e2e_flow.full_model_classes, strict=True))
    assert agree >= 0.6 * len(e2e_flow.labels), (e2e_flow.edge_classes, e2e_flow.full_model_classes)


def test_error_paths_answer_400_for_a_bad_payload_and_503_without_workers(e2e_flow):
    assert e2e_flow.error_statuses == (400, 503)


def _query(prometheus_url: str, expr: str) -> float:
    r = requests.get(prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    return sum(float(s["value"][1]) for s in r["data"]["result"])


def test_prometheus_scraped_the_job_counters(live_stack, e2e_flow):
    deadline = time.monotonic() + 60
    while True:
        analyzer = _query(live_stack.prometheus_url, 'isplit_analyzer_jobs_total{status="succeeded"}')
        trainer = _query(live_stack.prometheus_url, 'isplit_trainer_candidates_total{outcome="succeeded"}')
        if analyzer > 0 and trainer > 0:
            break
        assert time.monotonic() < deadline, (analyzer, trainer)
        time.sleep(1)
