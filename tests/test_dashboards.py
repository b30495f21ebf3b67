"""Grafana dashboards and Prometheus alerts of charts/isplit, checked with the real promtool.

Every dashboard is Grafana dashboard JSON of the shape Grafana 10/11 provisions; every PromQL
query parses (``promtool check rules``) and selects only metrics the services export; the
alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests import promql

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "isplit"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
ALERTS = CHART / "files" / "alerts.rules.yaml"
ALERT_TESTS = CHART / "files" / "alerts.test.yaml"
CONTRACTS = ROOT / "docs" / "CONTRACTS.md"

# The subset of Grafana's dashboard model these dashboards use, strict where a typo would make
# Grafana drop a panel or a query silently.
DATASOURCE_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"type": "string"}, "uid": {"type": "string"}},
}
GRID_POS = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "additionalProperties": False,
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
TARGET = {
    "type": "object",
    "required": ["refId", "expr", "datasource"],
    "properties": {
        "refId": {"type": "string", "pattern": "^[A-Z]$"},
        "expr": {"type": "string", "minLength": 1},
        "legendFormat": {"type": "string"},
        "datasource": DATASOURCE_REF,
        "range": {"type": "boolean"},
        "instant": {"type": "boolean"},
        "editorMode": {"enum": ["code", "builder"]},
    },
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text"]},
        "title": {"type": "string", "minLength": 1},
        "gridPos": GRID_POS,
        "datasource": DATASOURCE_REF,
        "targets": {"type": "array", "items": TARGET},
        "fieldConfig": {
            "type": "object",
            "required": ["defaults", "overrides"],
            "properties": {"defaults": {"type": "object"}, "overrides": {"type": "array"}},
        },
        "options": {"type": "object"},
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {"required": ["collapsed", "panels"]},
    "else": {"required": ["datasource", "targets", "fieldConfig", "options"]},
}
DASHBOARD_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time", "tags", "annotations"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "id": {"type": "null"},
        "tags": {"type": "array", "items": {"type": "string"}, "contains": {"const": "isplit"}},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "refresh": {"type": "string"},
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "type"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                            "type": {"enum": ["datasource", "query", "custom", "constant", "interval"]},
                        },
                    },
                }
            },
        },
        "annotations": {"type": "object", "required": ["list"]},
    },
}


@pytest.fixture(scope="session")
def exported_metric_names(live_stack, e2e_flow) -> set[str]:
    """Names of the metrics the services really export: a scrape of the live analyzer, trainer
    and TorchServe ``/metrics`` after the end-to-end flow has run through them (so TorchServe's
    per-model and the handler's custom metrics exist)."""
    import requests

    names: set[str] = set()
    for url in live_stack.metrics_urls().values():
        for line in requests.get(url, timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    assert "isplit_trainer_consumer_lag" in names and "ts_inference_requests_total" in names, (
        live_stack.metrics_urls(),
        sorted({n.split("_")[0] + "_" + n.split("_")[1] for n in names if "_" in n}),
    )
    return names


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def panels_with_targets(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return found


def dashboard_queries(dashboard: dict) -> dict[str, str]:
    """Every PromQL query of a dashboard (targets and query variables), keyed by where it is."""
    queries = {}
    for panel in panels_with_targets(dashboard):
        for target in panel.get("targets", []):
            queries[f"{dashboard['uid']} panel {panel['id']} ({panel['title']}) {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            queries[f"{dashboard['uid']} variable {variable['name']}"] = query
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# --- the helper itself -------------------------------------------------------------------------


def test_metric_names_ignores_functions_labels_ranges_and_grouping():
    expr = (
        'sum by (namespace, le) (rate(a_seconds_bucket{code=~"5..", x="b_total"}[5m] offset 1h))'
        " / on (namespace) group_left ignoring (pod) max without (pod) (c_total) > bool 0.5 or vector(0)"
    )
    assert promql.metric_names(expr) == {"a_seconds_bucket", "c_total"}


def test_metric_names_reads_name_matchers():
    assert promql.metric_names('sum(rate({__name__="Requests5XX", Level="Host"}[1m]))') == {"Requests5XX"}


def test_is_exported_allows_histogram_series_only():
    exported = {"isplit_tail_decode_seconds", "ts_inference_requests_total"}
    assert promql.is_exported("isplit_tail_decode_seconds_bucket", exported)
    assert promql.is_exported("ts_inference_requests_total", exported)
    assert not promql.is_exported("isplit_tail_decode_seconds_total", exported)
    assert not promql.is_exported("isplit_tail_decode", exported)


def test_check_expressions_rejects_bad_promql_by_name():
    ok, output = promql.check_expressions({"good": "rate(x_total[5m])", "broken": "sum(rate(x_total[5m])"})
    assert not ok
    assert '"broken"' in output


# --- dashboards -------------------------------------------------------------------------------


def test_the_three_dashboards_ship():
    assert {path.stem for path in DASHBOARDS} == {"pipeline-overview", "trainer", "tail-serving"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_grafana_dashboard_json(path):
    dashboard = load_dashboard(path)
    jsonschema.Draft7Validator(DASHBOARD_SCHEMA).validate(dashboard)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_panels_have_unique_ids_and_do_not_overlap(path):
    dashboard = load_dashboard(path)
    panels = [p for p in dashboard["panels"]] + [c for p in dashboard["panels"] for c in p.get("panels", [])]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_use_the_datasource_variable(path):
    dashboard = load_dashboard(path)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels_with_targets(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= set(variables), f"{panel['title']} uses undefined variables {used - set(variables)}"


def test_every_dashboard_query_parses_with_promtool():
    queries = {}
    for path in DASHBOARDS:
        queries.update({where: promql.from_grafana(q) for where, q in dashboard_queries(load_dashboard(path)).items()})
    assert len(queries) >= 30
    ok, output = promql.check_expressions(queries)
    assert ok, output


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_name_only_exported_metrics(path, exported_metric_names):
    unknown = {}
    for where, query in dashboard_queries(load_dashboard(path)).items():
        for name in promql.metric_names(promql.from_grafana(query)):
            if not promql.is_exported(name, exported_metric_names):
                unknown[where] = name
    assert not unknown, f"queries select metrics no service exports: {unknown}"


@pytest.mark.parametrize(
    ("stem", "required"),
    [
        (
            "pipeline-overview",
            {
                "isplit_analyzer_jobs_total",
                "isplit_analyzer_jobs_in_progress",
                "isplit_trainer_candidates_total",
                "isplit_analyzer_results_consumed_total",
                "isplit_trainer_consumer_lag",
            },
        ),
        (
            "trainer",
            {
                "isplit_trainer_training_seconds_bucket",
                "isplit_trainer_loss",
                "isplit_trainer_epoch",
                "isplit_trainer_samples_per_second",
                "isplit_trainer_gpu_memory_bytes",
            },
        ),
        (
            "tail-serving",
            {
                "ts_inference_requests_total",
                "ts_inference_latency_microseconds",
                "isplit_tail_decode_seconds_bucket",
                "isplit_tail_batch_size_sum",
                "isplit_tail_payload_bytes_sum",
            },
        ),
    ],
)
def test_dashboard_covers_its_subject(stem, required):
    dashboard = load_dashboard(CHART / "dashboards" / f"{stem}.json")
    selected = set().union(
        *(promql.metric_names(promql.from_grafana(q)) for q in dashboard_queries(dashboard).values())
    )
    assert required <= selected, f"{stem} lacks {required - selected}"


def test_tail_serving_dashboard_shows_latency_percentiles():
    dashboard = load_dashboard(CHART / "dashboards" / "tail-serving.json")
    exprs = " ".join(dashboard_queries(dashboard).values())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(isplit_tail_decode_seconds_bucket" in exprs


def test_dashboard_uids_are_unique():
    uids = [load_dashboard(path)["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids))


# --- alerts -------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    ok, output = promql.run_promtool("check", "rules", str(ALERTS))
    assert ok, output
    assert "SUCCESS" in output


def test_alert_rules_pass_their_promtool_unit_tests():
    ok, output = promql.run_promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert ok, output


def test_alerts_cover_the_failure_modes():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    covered = {
        "analyzer errors": "isplit_analyzer_http_request_seconds_count",
        "trainer dead letters": 'outcome="dead_lettered"',
        "trainer lag": "isplit_trainer_consumer_lag",
        "TorchServe 5xx": "Requests5XX",
        "TorchServe latency": "ts_inference_latency_microseconds",
    }
    for concern, needle in covered.items():
        assert any(needle in rule["expr"] for rule in rules.values()), f"no alert for {concern}"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alerts_name_only_exported_metrics(exported_metric_names):
    for rule in alert_rules():
        for name in promql.metric_names(rule["expr"]):
            assert promql.is_exported(name, exported_metric_names), f"{rule['alert']} selects {name}"


def test_every_alert_has_a_unit_test():
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == {rule["alert"] for rule in alert_rules()}
