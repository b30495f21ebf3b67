"""The analyzer's routes in-process (FastAPI ``TestClient``), their dependencies overridden:
a fresh SQLite store, no Kafka, a job runner that records cancellations, a token file with
the principals of ``PRINCIPALS`` (the client sends alice's token unless a test says otherwise).
The real-process behaviour (analysis processes, Kafka, restarts, slow clients, streamed
uploads) is specified in ``test_analyzer.py`` and ``test_analyzer_limits.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from isplit.auth import bearer
from isplit_analyzer.api.deps import State, get_state
from isplit_analyzer.app import create_app
from isplit_analyzer.config import Settings
from isplit_analyzer.schemas import AnalysisRequest
from isplit_analyzer.store import CandidateRow, Job, ModelRecord, make_engine, session_factory
from tests.fixtures.services import make_tokens

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
        artifact_root=tmp_path / "artifacts",
        data_root=tmp_path / "data",
        kafka_bootstrap="127.0.0.1:1",
        analyzer_tokens_file=tmp_path / "tokens.jsonl",
    )
    tokens = make_tokens(settings.analyzer_tokens_file)
    settings.artifact_root.mkdir(parents=True)
    (settings.data_root / "flowers" / "rose").mkdir(parents=True)
    sessions = session_factory(make_engine(settings.db_url()))
    with sessions.begin() as s:
        s.add(ModelRecord(id=MODEL_ID, arch="vgg11", sha256=SHA, size_bytes=1, info=DIGITS_INFO, owner="alice"))
    state = State(settings, sessions, RecordingRunner(), None)  # type: ignore[arg-type]
    app = create_app(settings)
    app.dependency_overrides[get_state] = lambda: state
    client = TestClient(app, headers=bearer(tokens["alice"]))
    client.state = state  # type: ignore[attr-defined]
    client.tokens = tokens  # type: ignore[attr-defined]
    return client


def as_(api: TestClient, principal: str | None) -> dict[str, str]:
    """Headers that send ``principal``'s token (no Authorization header for None)."""
    return bearer(api.tokens[principal]) if principal else {"Authorization": ""}  # type: ignore[attr-defined]


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
                          info={**DIGITS_INFO, "num_classes": 5}, owner="alice"))  # fmt: skip
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


# -- authentication and ownership ---------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer isplit_not-a-token"}, {"Authorization": "Basic x"}])
def test_api_calls_without_a_valid_token_get_401_with_a_bearer_challenge(api, headers):
    for method, path in (("GET", "/v1/analyses"), ("POST", "/v1/analyses"), ("GET", f"/v1/models/{MODEL_ID}")):
        r = api.request(method, path, headers={"Authorization": "", **headers}, json={})
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["title"] == "Unauthorized" and "token" in r.json()["detail"]


def test_health_readiness_and_metrics_stay_open(api):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert api.get(path, headers={"Authorization": ""}).status_code in (200, 503), path
    assert api.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_a_token_without_the_scope_gets_403_naming_it(api):
    assert api.get("/v1/analyses", headers=as_(api, "reader")).status_code == 200
    r = api.post("/v1/analyses", json={"model_id": MODEL_ID, "dataset": "digits"}, headers=as_(api, "reader"))
    assert r.status_code == 403 and r.json()["detail"] == "token 'reader' lacks the 'submit' scope"
    assert api.delete(f"/v1/models/{MODEL_ID}", headers=as_(api, "reader")).status_code == 403


def test_another_principals_jobs_and_models_are_404_and_admin_sees_all(api):
    job_id = submit(api)  # alice's, on alice's model
    assert api.get(f"/v1/analyses/{job_id}").json()["owner"] == "alice"
    bob = as_(api, "bob")
    for method, path in (("GET", f"/v1/analyses/{job_id}"), ("GET", f"/v1/analyses/{job_id}/plot.png"),
                         ("GET", f"/v1/analyses/{job_id}/plan"), ("DELETE", f"/v1/analyses/{job_id}"),
                         ("GET", f"/v1/models/{MODEL_ID}"), ("DELETE", f"/v1/models/{MODEL_ID}")):  # fmt: skip
        r = api.request(method, path, headers=bob)
        assert r.status_code == 404, (method, path, r.text)
    assert api.get("/v1/analyses", headers=bob).json() == {"items": [], "total": 0, "limit": 20, "offset": 0}
    r = api.post("/v1/analyses", json={"model_id": MODEL_ID, "dataset": "digits"}, headers=bob)
    assert r.status_code == 422 and f"model_id {MODEL_ID!r} not found" in r.json()["detail"]
    root = as_(api, "root")
    assert [i["id"] for i in api.get("/v1/analyses", headers=root).json()["items"]] == [job_id]
    assert api.get(f"/v1/models/{MODEL_ID}", headers=root).json()["owner"] == "alice"
    r = api.delete(f"/v1/analyses/{job_id}", headers=root)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_a_token_added_to_the_file_works_without_a_restart(api):
    from isplit.auth import add_token

    token = add_token(api.state.settings.analyzer_tokens_file, "carol", ["read"])  # type: ignore[attr-defined]
    assert api.get("/v1/analyses", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_openapi_declares_the_bearer_scheme_on_the_api_routes_only(api):
    doc = api.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert doc["paths"]["/v1/analyses"]["post"]["security"] == [{"bearer": []}]
    assert "401" in doc["paths"]["/v1/analyses"]["post"]["responses"]
    assert "security" not in doc["paths"]["/healthz"]["get"]


# -- inputs that gave a 500 or were taken for what they are not ---------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"dataset": "imagefolder:a\u0000b"}, "contains a control character"),
        ({"classes": ["²"]}, "unknown class '²'"),
        ({"classes": ["５"]}, "unknown class '５'"),
        ({"classes": ["٥"]}, "unknown class '٥'"),
        ({"classes": [True]}, "classes.0"),
        ({"classes": [1.0]}, "classes.0"),
    ],
)
def test_odd_datasets_and_class_strings_get_422_naming_the_value(api, body, needle):
    r = api.post("/v1/analyses", json={"model_id": MODEL_ID, "dataset": "digits", **body})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


# -- uploads: metadata and weights checked before the model is built; delete --------------------


def _crafted(tmp_path: Path, source: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    import torch

    ckpt = torch.load(source, weights_only=True)
    edit(ckpt)
    out = tmp_path / name
    torch.save(ckpt, out)
    return out


def _nan_first_weight(ckpt: dict) -> None:
    ckpt["state_dict"]["features.0.weight"][0, 0, 0, 0] = float("nan")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_nan_first_weight, "tensor 'features.0.weight' holds NaN or infinite values"),
        (lambda c: c["info"].update(std=[0.0]), "std.0: Input should be greater than 0 (got 0.0)"),
        (lambda c: c["info"].update(mean=[float("inf")]), "mean.0"),
        (lambda c: c["info"].update(class_names=["a", "b", "c"]), "3 class_names for num_classes=10"),
        (lambda c: c["info"].update(width=4.5), "width: Input should be less than or equal to 4"),
        (lambda c: c["info"].update(input_size=100_000), "input_size"),
        (lambda c: c["info"].update(num_classes=10**9), "num_classes"),
        (lambda c: c["info"].update(width=4.0), "do not match the vgg11 (width 4.0"),
    ],
)
def test_bad_checkpoint_metadata_or_weights_get_422_at_upload(api, tmp_path, digits_checkpoint, edit, needle):
    path = _crafted(tmp_path, digits_checkpoint, "bad.pt", edit)
    with open(path, "rb") as fh:
        r = api.post("/v1/models", files={"file": ("bad.pt", fh)})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"] and "upload 'bad.pt'" in r.json()["detail"]


def test_a_model_is_deleted_by_its_owner_once_no_analysis_uses_it(api, digits_checkpoint):
    with open(digits_checkpoint, "rb") as fh:
        model = api.post("/v1/models", files={"file": ("m.pt", fh)}).json()
    model_id, root = model["model_id"], api.state.settings.artifact_root  # type: ignore[attr-defined]
    assert model["owner"] == "alice" and (root / "models" / f"{model_id}.pt").exists()
    job_id = submit(api, model_id=model_id)
    r = api.delete(f"/v1/models/{model_id}")
    assert r.status_code == 409 and f"analysis {job_id!r} of it is queued" in r.json()["detail"]
    with api.state.sessions.begin() as s:  # type: ignore[attr-defined]
        s.get(Job, job_id).status = "succeeded"
        s.add(CandidateRow(candidate_id=f"{job_id}-c1", analysis_id=job_id, cut="features.0", predicted_rank=1,
                           size_rank=1, cui=1.0, log10_cui=0.0, output_bytes=4, message="{}", published=True))  # fmt: skip
    r = api.delete(f"/v1/models/{model_id}")
    assert r.status_code == 409 and "candidates still training" in r.json()["detail"]
    with api.state.sessions.begin() as s:  # type: ignore[attr-defined]
        s.get(CandidateRow, f"{job_id}-c1").result = {"status": "succeeded"}
    assert api.delete(f"/v1/models/{model_id}", headers=as_(api, "bob")).status_code == 404
    assert api.delete(f"/v1/models/{model_id}").status_code == 204
    assert not (root / "models" / f"{model_id}.pt").exists()
    assert api.get(f"/v1/models/{model_id}").status_code == 404
    assert api.get(f"/v1/analyses/{job_id}").status_code == 200  # the finished analysis stays


def test_a_store_from_before_authentication_gains_the_owner_column_and_only_admin_sees_its_rows(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:  # the jobs and models tables as the previous version made them
        conn.execute("CREATE TABLE models (id VARCHAR(32) PRIMARY KEY, arch VARCHAR(64), sha256 VARCHAR(64), "
                     "size_bytes INTEGER, info JSON, created_at DATETIME)")  # fmt: skip
        conn.execute("INSERT INTO models VALUES ('m-0000000000aa', 'vgg11', 'x', 1, '{}', '2026-01-01 00:00:00')")
    sessions = session_factory(make_engine(f"sqlite:///{db}"))
    with sessions() as s:
        old = s.get(ModelRecord, "m-0000000000aa")
        assert old is not None and old.owner is None
    from isplit.auth import Principal
    from isplit_analyzer.api.auth import visible

    assert not visible(old.owner, Principal(name="alice", scopes=frozenset({"read"})))
    assert visible(old.owner, Principal(name="root", scopes=frozenset({"admin"})))
