"""Schemathesis against the analyzer's own OpenAPI document: no input yields a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.test_analyzer import Analyzer


@pytest.fixture(scope="module")
def analyzer_schema(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str):
    root: Path = tmp_path_factory.mktemp("schema")
    service = Analyzer(root / "artifacts", kafka_bootstrap, root / "analyzer.log").start()
    yield schemathesis.openapi.from_url(service.url + "/openapi.json")
    service.proc.terminate()


schema = schemathesis.pytest.from_fixture("analyzer_schema")


@pytest.mark.kafka
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_analyzer_fail_with_5xx(case):
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
