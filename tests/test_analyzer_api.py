"""The analyzer's routes in-process (FastAPI ``TestClient``), their dependencies overridden:
a fresh SQLite store, no Kafka, a job runner that records cancellations. The real-process
behaviour (analysis processes, Kafka, restarts) is specified in ``test_analyzer.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from isplit_analyzer.api.deps import State, get_state
from isplit_analyzer.app import create_app
from isplit_analyzer.config import Settings
from isplit_analyzer.schemas import AnalysisRequest
from isplit_analyzer.store import CandidateRow, Job, ModelRecord, make_engine, session_factory

MODEL_ID = "m-0123456789ab"
SHA = "ab" * 32
DIGITS_INFO = {"num_classes": 10, "in_channels": 1, "input_size": 32, "class_names": [str(d) for d in range(10)]}


class RecordingRunner:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


@pytest.fixture
def api(tmp_path: Path):
    settings = Settings(
        artifact_root=tmp_path / "artifacts", data_root=tmp_path / "data", kafka_bootstrap="127.0.0.1:1"
    )
    settings.artifact_root.mkdir(parents=True)
    (settings.data_root / "flowers" / "rose").mkdir(parents=True)
    sessions = session_factory(make_engine(settings.db_url()))
    with sessions.begin() as s:
        s.add(ModelRecord(id=MODEL_ID, arch="vgg11", sha256=SHA, size_bytes=1, info=DIGITS_INFO))
    state = State(settings, sessions, RecordingRunner(), None)  # type: ignore[arg-type]
    app = create_app(settings)
    app.dependency_overrides[get_state] = lambda: state
    client = TestClient(app)
    client.state = state  # type: ignore[attr-defined]
    return client


def submit(api: TestClient, **body) -> str:
    r = api.post("/v1/analyses", json={"model_id": MODEL_ID, "dataset": "digits", **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_health_answers_and_readiness_names_what_is_unreachable(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    r = api.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["detail"] == "not ready: kafka unreachable"


def test_submit_answers_202_with_the_status_url_in_location(api):
    r = api.post("/v1/analyses", json={"model_id": MODEL_ID, "dataset": "digits"})
    assert r.status_code == 202
    assert r.headers["location"] == r.json()["status_url"] == f"/v1/analyses/{r.json()['id']}"
    assert r.json()["status"] == "queued"


def test_the_job_stores_the_request_resolved(api):
    job_id = submit(api, classes=["7", 1], options={"top_k": 2})
    view = api.get(f"/v1/analyses/{job_id}").json()
    assert view["request"]["classes"] == [1, 7]
    assert view["request"]["weights_sha256"] == SHA
    assert view["request"]["options"]["top_k"] == 2
    assert list(view["request"]) == [*AnalysisRequest.model_fields, "weights_sha256"]


def test_an_image_folder_is_stored_as_its_absolute_path_under_the_data_root(api):
    r = api.post("/v1/analyses", json={"model_id": MODEL_ID, "dataset": "imagefolder:flowers"})
    assert r.status_code == 202, r.text
    view = api.get(r.json()["status_url"]).json()
    root = api.state.settings.data_root.resolve()  # type: ignore[attr-defined]
    assert view["request"]["dataset"] == f"imagefolder:{root / 'flowers'}"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"dataset": "fashion-mnist", "model_id": "m-000000000000"}, "model_id 'm-000000000000' not found"),
        ({"classes": ["cat"]}, "unknown class 'cat'"),
        ({"classes": [12]}, "class index 12 out of range"),
        ({"arch": "resnet50"}, "arch 'resnet50' does not match the uploaded model ('vgg11')"),
        ({"dataset": "imagefolder:../../etc"}, "outside the data root"),
        ({"dataset": "imagefolder:tulips"}, "dataset folder 'tulips' does not exist"),
        ({"options": {"max_images": 0}}, "options.max_images"),
        ({"options": {"colour": "red"}}, "options.colour"),
    ],
)
def test_bad_requests_get_a_422_problem_naming_the_value(api, body, needle):
    r = api.post("/v1/analyses", json={"model_id": MODEL_ID, "dataset": "digits", **body})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["title"] == "Unprocessable Content"
    assert needle in r.json()["detail"]


def test_a_dataset_with_another_class_count_than_the_model_is_refused(api):
    with api.state.sessions.begin() as s:  # type: ignore[attr-defined]
        s.add(ModelRecord(id="m-00000000000f", arch="vgg11", sha256=SHA, size_bytes=1,
                          info={**DIGITS_INFO, "num_classes": 5}))  # fmt: skip
    r = api.post("/v1/analyses", json={"model_id": "m-00000000000f", "dataset": "digits"})
    assert r.status_code == 422 and r.json()["detail"] == "dataset 'digits' has 10 classes, the model has 5"


def test_unknown_ids_get_404_and_a_plot_before_the_analysis_409(api):
    assert api.get("/v1/analyses/a-nope").status_code == 404
    assert api.get("/v1/models/m-nope").json()["detail"] == "model 'm-nope' not found"
    job_id = submit(api)
    r = api.get(f"/v1/analyses/{job_id}/plot.png")
    assert r.status_code == 409 and "has no plot yet (status queued)" in r.json()["detail"]


def test_cancel_stops_the_job_once_and_a_finished_job_answers_409(api):
    job_id = submit(api)
    r = api.delete(f"/v1/analyses/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert api.state.runner.cancelled == [job_id]  # type: ignore[attr-defined]
    r = api.delete(f"/v1/analyses/{job_id}")
    assert r.status_code == 409 and r.json()["detail"] == f"analysis {job_id!r} already cancelled"


def test_listing_filters_by_status_newest_first(api):
    first, second = submit(api), submit(api)
    api.delete(f"/v1/analyses/{first}")
    page = api.get("/v1/analyses", params={"status": "queued"}).json()
    assert page["total"] == 1 and [i["id"] for i in page["items"]] == [second]
    assert [i["id"] for i in api.get("/v1/analyses").json()["items"]] == [second, first]
    assert api.get("/v1/analyses", params={"status": "lost"}).status_code == 422


def _measured(api: TestClient, accuracies: list[float], output_bytes: list[int]) -> str:
    job_id = submit(api)
    with api.state.sessions.begin() as s:  # type: ignore[attr-defined]
        s.get(Job, job_id).status = "succeeded"
        for rank, (acc, size) in enumerate(zip(accuracies, output_bytes, strict=True), start=1):
            s.add(CandidateRow(candidate_id=f"{job_id}-c{rank}", analysis_id=job_id, cut=f"c{rank}",
                               predicted_rank=rank, size_rank=rank, cui=10.0 ** -rank, log10_cui=-float(rank),
                               output_bytes=size, message="{}", published=True,
                               result={"status": "succeeded", "accuracy_split": acc}))  # fmt: skip
    return job_id


def test_measured_candidates_are_correlated_with_cui_and_with_output_size(api):
    # Ranked 1, 2, 3 by CUI, measured 0.9, 0.8, 0.7; outputs grow with rank (smaller is better).
    job_id = _measured(api, [0.9, 0.8, 0.7], [100, 200, 400])
    correlation = api.get(f"/v1/analyses/{job_id}").json()["correlation"]
    assert correlation == {"measured": 3, "spearman_cui": pytest.approx(1.0), "spearman_size": pytest.approx(1.0)}


def test_one_measured_candidate_has_no_correlation_yet(api):
    job_id = _measured(api, [0.9], [100])
    assert api.get(f"/v1/analyses/{job_id}").json()["correlation"] == {
        "measured": 1,
        "spearman_cui": None,
        "spearman_size": None,
    }


def test_an_upload_declared_too_large_gets_413(api):
    api.state.settings.max_upload_bytes = 10  # type: ignore[attr-defined]
    r = api.post("/v1/models", files={"file": ("w.pt", b"x" * 100_000)})
    assert r.status_code == 413 and "exceeds the limit of 10 bytes" in r.json()["detail"]


def test_an_upload_that_is_no_checkpoint_gets_422_naming_the_upload(api):
    r = api.post("/v1/models", files={"file": ("w.pt", b"not a checkpoint")})
    assert r.status_code == 422
    assert "upload 'w.pt'" in r.json()["detail"] and "/tmp" not in r.json()["detail"]


def test_an_unexpected_error_is_a_500_problem_without_a_traceback(api):
    def broken() -> State:
        raise RuntimeError("disk on fire")

    api.app.dependency_overrides[get_state] = broken  # type: ignore[attr-defined]
    r = api.get("/v1/analyses")
    assert r.status_code == 500
    assert r.json() == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "internal error (RuntimeError)",
    }
