"""The analyzer's routes for brought models and head artifacts, in-process (``TestClient``):
``.pt2`` uploads with optional names and normalisation, 422s naming the problem, and each
measured candidate's head files listed and streamed by id and format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from isplit.exported import read_meta
from isplit_analyzer.jobs import model_path
from isplit_analyzer.store import CandidateRow, Job
from tests.test_analyzer_api import _measured, api  # noqa: F401 (the fixture)
from tests.test_exported import TinyNet, Tokens, export


def _upload(client: TestClient, path: Path, **fields: str):
    with open(path, "rb") as fh:
        return client.post("/v1/models", files={"file": (path.name, fh)}, data=fields)


def test_a_program_upload_stores_its_names_and_normalisation_inside_it(api, tmp_path: Path) -> None:  # noqa: F811
    names = ",".join(f"d{i}" for i in range(10))
    r = _upload(api, export(TinyNet(), tmp_path / "tiny.pt2"), class_names=names, mean="0.5", std="0.25")
    assert r.status_code == 201, r.text
    view = r.json()
    assert (view["arch"], view["in_channels"], view["input_size"]) == ("exported", 1, 32)
    assert view["class_names"] == names.split(",")
    stored = read_meta(model_path(api.state.settings.artifact_root, view["model_id"]))  # type: ignore[attr-defined]
    assert (stored.class_names, stored.mean, stored.std) == (names.split(","), [0.5], [0.25])


def test_bad_program_uploads_answer_422_naming_the_problem(api, tmp_path: Path) -> None:  # noqa: F811
    tiny = export(TinyNet(), tmp_path / "tiny.pt2")
    cases = [
        (_upload(api, tiny, mean="a,b"), "mean must be comma-separated numbers"),
        (_upload(api, tiny, std="0.2,0.3"), "std has 2 values; the program takes 1 channels"),
        (_upload(api, tiny, class_names="a,b"), "2 class names given; the program has 10 outputs"),
        (_upload(api, export(Tokens(), tmp_path / "tokens.pt2")), "output has shape (1, 64, 4)"),
    ]
    for r, message in cases:
        assert r.status_code == 422 and message in r.text, r.text
    assert "tokens.pt2" in cases[-1][0].text and str(tmp_path) not in cases[-1][0].text


def test_measured_candidates_list_their_head_files_and_stream_them(api) -> None:  # noqa: F811
    job_id = _measured(api, [0.9], [100])
    cid = f"{job_id}-c1"
    folder = api.state.settings.artifact_root / "candidates" / cid  # type: ignore[attr-defined]
    folder.mkdir(parents=True)
    (folder / "head.onnx").write_bytes(b"onnx-bytes" * 10)
    (folder / "head.pt").write_bytes(b"ts" * 7)
    artifacts = {"onnx": {"file": "head.onnx", "sha256": "ab" * 32, "opset": 18}}
    (folder / "head.json").write_text(json.dumps({"artifacts": artifacts}))
    cand = api.get(f"/v1/analyses/{job_id}").json()["candidates"][0]
    listed = {a["format"]: a for a in cand["head_artifacts"]}
    assert set(listed) == {"onnx", "torchscript"}
    assert (listed["onnx"]["bytes"], listed["onnx"]["opset"], listed["onnx"]["sha256"]) == (100, 18, "ab" * 32)
    assert listed["torchscript"]["bytes"] == 14
    r = api.get(listed["onnx"]["url"])
    assert r.status_code == 200 and r.content == b"onnx-bytes" * 10
    base = f"/v1/analyses/{job_id}/candidates"
    assert api.get(f"{base}/{cid}/head/executorch").status_code == 404  # not written
    assert api.get(f"{base}/{cid}/head/..%2Fhead.json").status_code == 404
    assert api.get(f"{base}/{job_id}-c9/head/onnx").status_code == 404
    assert api.get(f"/v1/analyses/a-000000000000/candidates/{cid}/head/onnx").status_code == 404


def test_a_candidate_not_yet_measured_lists_no_head_files(api) -> None:  # noqa: F811
    job_id = _measured(api, [0.9], [100])
    with api.state.sessions.begin() as s:  # type: ignore[attr-defined]
        s.get(CandidateRow, f"{job_id}-c1").result = None
        s.get(Job, job_id).status = "analysed"
    folder = api.state.settings.artifact_root / "candidates" / f"{job_id}-c1"  # type: ignore[attr-defined]
    folder.mkdir(parents=True)
    (folder / "head.onnx").write_bytes(b"x")
    assert api.get(f"/v1/analyses/{job_id}").json()["candidates"][0]["head_artifacts"] == []


def test_models_are_rebuilt_for_any_batch_after_upload(api, tmp_path: Path) -> None:  # noqa: F811
    from isplit.checkpoint import load_model

    r = _upload(api, export(TinyNet(), tmp_path / "tiny.pt2"))
    stored = model_path(api.state.settings.artifact_root, r.json()["model_id"])  # type: ignore[attr-defined]
    model, info = load_model(stored)
    assert model(torch.zeros(4, 1, 32, 32)).shape == (4, 10) and info.extra["class_names_given"] is False
