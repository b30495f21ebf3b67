"""The analyzer service as a real process, against the real Kafka broker."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import requests

from isplit.auth import bearer
from isplit.bus import Topics
from isplit.messages import SplitCandidate, TrainingResult
from tests.fixtures.services import ServiceProcess, free_port, make_tokens
from tests.kafka_util import collect, send

pytestmark = pytest.mark.kafka


class Analyzer:
    """A real analyzer process; its token file (beside ``root``) holds ``PRINCIPALS``, and the
    helpers send alice's token (``as_`` picks another principal)."""

    def __init__(self, root: Path, bootstrap: str, log: Path, topics: Topics | None = None, **extra: str) -> None:
        self.topics = topics or Topics(f"test-{uuid.uuid4().hex[:8]}.")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tokens_file = root.parent / f"{root.name}-tokens.jsonl"
        self.tokens = make_tokens(tokens_file) if not tokens_file.exists() else {}
        env = {
            "ISPLIT_ANALYZER_TOKENS_FILE": str(tokens_file),
            "ISPLIT_KAFKA_BOOTSTRAP": bootstrap,
            "ISPLIT_ARTIFACT_ROOT": str(root),
            "ISPLIT_ANALYZER_PORT": str(self.port),
            "ISPLIT_ANALYZER_DEVICE": "cpu",
            "ISPLIT_TOPIC_PREFIX": self.topics.prefix,
            "ISPLIT_RESULTS_GROUP": "test-analyzer-" + uuid.uuid4().hex[:8],
            **extra,
        }
        self.proc = ServiceProcess("isplit-analyzer", env, log)

    def start(self) -> Analyzer:
        self.proc.start(health_url=self.url + "/healthz")
        return self

    def as_(self, principal: str = "alice") -> dict[str, str]:
        return bearer(self.tokens[principal])

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **{"headers": self.as_(), **kw})

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **{"headers": self.as_(), **kw})

    def delete(self, path: str, **kw) -> requests.Response:
        return requests.delete(self.url + path, timeout=10, **{"headers": self.as_(), **kw})

    def upload(self, checkpoint: Path) -> str:
        with open(checkpoint, "rb") as fh:
            r = self.post("/v1/models", files={"file": ("m.pt", fh)})
        assert r.status_code == 201, r.text
        return r.json()["model_id"]

    def submit(self, model_id: str, **body) -> str:
        r = self.post("/v1/analyses", json={"model_id": model_id, "dataset": "digits", **body})
        assert r.status_code == 202, r.text
        assert r.headers["location"] == r.json()["status_url"]
        return r.json()["id"]

    def wait(self, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view = self.get(f"/v1/analyses/{job_id}").json()
            if view["status"] in statuses:
                return view
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {view['status']}:\n{self.proc.log()}")


@pytest.fixture
def analyzer(tmp_path: Path, kafka_bootstrap: str):
    service = Analyzer(tmp_path / "artifacts", kafka_bootstrap, tmp_path / "analyzer.log").start()
    yield service
    service.proc.terminate()


@pytest.fixture
def model_id(analyzer: Analyzer, digits_checkpoint: Path) -> str:
    return analyzer.upload(digits_checkpoint)


def test_analysis_succeeds_and_publishes_its_top_candidates(analyzer, model_id, kafka_bootstrap):
    job = analyzer.submit(model_id, options={"max_images": 200, "top_k": 2})
    view = analyzer.wait(job)
    assert view["status"] == "succeeded", view["error"]
    result = view["result"]
    assert result["best"] in [p["module"] for p in result["points"]]
    assert [c["predicted_rank"] for c in view["candidates"]] == [1, 2]
    assert all(c["published"] for c in view["candidates"])
    published = collect(
        kafka_bootstrap, analyzer.topics.candidates, SplitCandidate, lambda c: c.analysis_id == job, count=2
    )
    assert sorted(c.cut for c in published) == sorted(c["cut"] for c in view["candidates"])
    assert published[0].model.weights_uri == f"models/{model_id}.pt"
    plot = analyzer.get(f"/v1/analyses/{job}/plot.png")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")


def test_class_subset_is_analysed_on_its_own_images(analyzer, model_id):
    job = analyzer.submit(model_id, classes=["1", 7], options={"max_images": 100, "top_k": 0})
    view = analyzer.wait(job)
    assert view["status"] == "succeeded", view["error"]
    assert view["result"]["classes"] == [1, 7]
    assert set(view["result"]["per_class_best"]) == {"1", "7"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"classes": ["cat"]}, "unknown class 'cat'"),
        ({"classes": [12]}, "class index 12 out of range"),
        ({"arch": "resnet50"}, "arch 'resnet50' does not match"),
        ({"options": {"max_images": 0}}, "options.max_images"),
        ({"options": {"target": "best"}}, "options.target"),
        ({"dataset": "imagefolder:../../etc"}, "outside the data root"),
    ],
)
def test_bad_analysis_requests_get_422_naming_the_value(analyzer, model_id, body, needle):
    r = analyzer.post("/v1/analyses", json={"model_id": model_id, "dataset": "digits", **body})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert needle in r.json()["detail"]


def test_unknown_model_and_analysis_ids(analyzer):
    r = analyzer.post("/v1/analyses", json={"model_id": "m-000000000000", "dataset": "digits"})
    assert r.status_code == 422 and "m-000000000000" in r.json()["detail"]
    assert analyzer.get("/v1/analyses/a-nope").status_code == 404
    assert analyzer.delete("/v1/analyses/a-nope").status_code == 404


def test_the_api_needs_a_token_and_the_probes_do_not(analyzer):
    r = requests.get(analyzer.url + "/v1/analyses", timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert analyzer.get("/v1/analyses", headers=analyzer.as_("bob")).json()["total"] == 0
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(analyzer.url + path, timeout=10).status_code == 200, path


def test_uploads_that_are_not_safe_checkpoints_are_refused(analyzer, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    for data in (evil.read_bytes(), b"not a checkpoint at all"):
        r = analyzer.post("/v1/models", files={"file": ("w.pt", data)})
        assert r.status_code == 422, r.text
        assert "cannot be loaded safely" in r.json()["detail"] or "not" in r.json()["detail"]


def test_oversized_upload_gets_413(tmp_path, kafka_bootstrap):
    service = Analyzer(tmp_path / "a", kafka_bootstrap, tmp_path / "a.log", ISPLIT_MAX_UPLOAD_BYTES="1000").start()
    try:
        r = service.post("/v1/models", files={"file": ("w.pt", b"x" * 200_000)})
        assert r.status_code == 413 and "1000" in r.json()["detail"]
    finally:
        service.proc.terminate()


def test_mismatched_weights_for_the_arch_are_refused(analyzer, digits_checkpoint):
    with open(digits_checkpoint, "rb") as fh:
        r = analyzer.post("/v1/models", files={"file": ("m.pt", fh)}, data={"arch": "resnet18"})
    assert r.status_code == 422 and "resnet18" in r.json()["detail"]


def test_api_answers_in_milliseconds_while_an_analysis_runs_and_cancel_works(analyzer, model_id):
    job = analyzer.submit(model_id, options={"max_images": 1437, "batch_size": 8, "top_k": 0})
    analyzer.wait(job, statuses=("running",))
    slowest = 0.0
    for _ in range(20):
        t0 = time.perf_counter()
        assert analyzer.get("/healthz").status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 0.25
    r = analyzer.delete(f"/v1/analyses/{job}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert analyzer.delete(f"/v1/analyses/{job}").status_code == 409


def test_listing_is_paginated_newest_first(analyzer, model_id):
    ids = [analyzer.submit(model_id, options={"max_images": 20, "top_k": 0}) for _ in range(3)]
    page = analyzer.get("/v1/analyses", params={"limit": 2}).json()
    assert page["total"] == 3 and [i["id"] for i in page["items"]] == ids[::-1][:2]
    page2 = analyzer.get("/v1/analyses", params={"limit": 2, "offset": 2}).json()
    assert [i["id"] for i in page2["items"]] == ids[:1]
    assert analyzer.get("/v1/analyses", params={"limit": 0}).status_code == 422


def test_readyz_and_metrics(analyzer, model_id):
    assert analyzer.get("/readyz").status_code == 200
    analyzer.submit(model_id, options={"max_images": 20, "top_k": 0})
    text = analyzer.get("/metrics").text
    assert 'isplit_analyzer_jobs_total{status="queued"} 1.0' in text
    assert "isplit_analyzer_http_request_seconds_bucket" in text


def test_results_are_attached_and_correlated(analyzer, model_id, kafka_bootstrap):
    job = analyzer.submit(model_id, options={"max_images": 100, "top_k": 3})
    view = analyzer.wait(job)
    assert view["status"] == "succeeded"
    for i, cand in enumerate(view["candidates"]):
        send(
            kafka_bootstrap,
            analyzer.topics.results,
            job,
            TrainingResult(
                analysis_id=job,
                candidate_id=cand["candidate_id"],
                cut=cand["cut"],
                status="succeeded",
                accuracy_split=0.9 - 0.1 * i,
                bytes_per_image={"fp32": 400, "fp16": 200, "int8": 100},
                latency_ms=3.0,
            ),
        )
    deadline = time.monotonic() + 60
    while True:
        view = analyzer.get(f"/v1/analyses/{job}").json()
        if view["correlation"] and view["correlation"]["measured"] == 3:
            break
        assert time.monotonic() < deadline, analyzer.proc.log()
        time.sleep(0.5)
    assert view["candidates"][0]["measured"]["accuracy_split"] == pytest.approx(0.9)
    # Candidates ranked 1, 2, 3 by CUI measured 0.9, 0.8, 0.7: CUI order agrees perfectly.
    assert view["correlation"]["spearman_cui"] == pytest.approx(1.0)


def test_restart_mid_job_completes_and_publishes_each_candidate_once(tmp_path, kafka_bootstrap, digits_checkpoint):
    root = tmp_path / "artifacts"
    first = Analyzer(root, kafka_bootstrap, tmp_path / "first.log").start()
    model = first.upload(digits_checkpoint)
    job = first.submit(model, options={"max_images": 1437, "batch_size": 4, "top_k": 3})
    first.wait(job, statuses=("running",))
    first.proc.kill()  # a crash: the service and its analysis process die at once
    second = Analyzer(root, kafka_bootstrap, tmp_path / "second.log", topics=first.topics).start()
    second.tokens = first.tokens
    try:
        view = second.wait(job, timeout_s=300)
    finally:
        second.proc.terminate()
    assert view["status"] == "succeeded", view["error"]
    published = collect(
        kafka_bootstrap, first.topics.candidates, SplitCandidate, lambda c: c.analysis_id == job, count=3, linger_s=3
    )
    ids = [c.candidate_id for c in published]
    assert len(ids) == 3 and len(set(ids)) == 3
