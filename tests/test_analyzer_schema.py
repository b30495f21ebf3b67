"""Schemathesis against the analyzer's own OpenAPI document: no generated input yields a 5xx,
sent with a valid token (alice's, read and submit) so the generated bodies reach the routes."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.test_analyzer import Analyzer

pytestmark = pytest.mark.kafka


def test_no_generated_request_makes_the_analyzer_answer_5xx(tmp_path: Path, kafka_bootstrap: str):
    service = Analyzer(tmp_path / "artifacts", kafka_bootstrap, tmp_path / "analyzer.log").start()
    try:
        schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 9
        server_errors: list[str] = []
        for operation in operations:

            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def call(case) -> None:
                response = case.call(timeout=30, headers=service.as_())
                if response.status_code >= 500:
                    server_errors.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}"
                    )

            call()
        assert not server_errors, "\n".join(server_errors[:10])
        assert service.proc.proc.poll() is None
    finally:
        service.proc.terminate()
