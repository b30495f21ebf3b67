"""Bring your own model, end to end: a torch.export program of a class defined only in this test
is uploaded over HTTP to the real analyzer, analysed, a candidate trained by the real trainer,
its tail served by real TorchServe and called by the edge client (torch and ONNX Runtime heads);
and a torchvision family the zoo lacks (DenseNet-121) goes through cuts, retraining and export."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import torch
from torch import nn
from torchvision import models

from isplit.checkpoint import load_model
from isplit.cuts import find_cut_points
from isplit.data import load_dataset
from isplit.edge import EdgeClient
from isplit.export import export_pair
from isplit.messages import BottleneckSpec
from isplit.retrain import retrain_split
from tests.fixtures.stack import digits_test_pngs
from tests.test_exported import TinyNet, Tokens, export


def _wait_measured(api: str, job: str, stack, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        view = requests.get(f"{api}/v1/analyses/{job}", headers=stack.headers(), timeout=10).json()
        if view["status"] == "failed" or (view["candidates"] and all(c["measured"] for c in view["candidates"])):
            return view
        assert time.monotonic() < deadline, "flow timed out:\n" + stack.processes[1].log()[-3000:]
        time.sleep(1)


@pytest.mark.kafka
@pytest.mark.torchserve
@pytest.mark.slow
def test_an_uploaded_program_is_analysed_trained_served_and_called_from_both_runtimes(
    live_stack, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    program = export(TinyNet(), tmp_path / "tiny.pt2")
    api, auth = live_stack.analyzer_url, live_stack.headers()
    names = ",".join(f"digit-{i}" for i in range(10))
    with open(program, "rb") as fh:
        files = {"file": ("tiny.pt2", fh)}
        r = requests.post(api + "/v1/models", files=files, data={"class_names": names}, headers=auth, timeout=60)
    assert r.status_code == 201, r.text
    model = r.json()
    assert (model["arch"], model["input_size"], model["num_classes"]) == ("exported", 32, 10)
    body = {"model_id": model["model_id"], "dataset": "digits",
            "options": {"max_images": 100, "top_k": 1, "epochs": 1, "max_train_images": 200}}  # fmt: skip
    job = requests.post(api + "/v1/analyses", json=body, headers=auth, timeout=30).json()["id"]
    view = _wait_measured(api, job, live_stack)
    assert view["status"] == "succeeded", view["error"]
    cand = view["candidates"][0]
    assert cand["cut"] in {"stem.0", "stem.3", "body.0", "body.2"}  # the user's module names
    measured = cand["measured"]
    assert measured["status"] == "succeeded", measured.get("error")

    # The head artifacts are listed with sizes and streamed by candidate id and format.
    listed = {a["format"]: a for a in cand["head_artifacts"]}
    assert {"torchscript", "onnx", "program"} <= set(listed) and listed["onnx"]["opset"] == 18
    folder = live_stack.artifact_root / Path(measured["head_uri"]).parent
    onnx_bytes = requests.get(api + listed["onnx"]["url"], headers=auth, timeout=30)
    assert onnx_bytes.status_code == 200 and onnx_bytes.content == (folder / "head.onnx").read_bytes()
    assert len(onnx_bytes.content) == listed["onnx"]["bytes"]
    base = f"{api}/v1/analyses/{job}/candidates"
    assert requests.get(f"{base}/{cand['candidate_id']}/head/pickle", headers=auth, timeout=10).status_code == 404
    assert requests.get(f"{base}/nope/head/onnx", headers=auth, timeout=10).status_code == 404

    # The edge: real images, each runtime's head, the tail in TorchServe; equal to head+tail here.
    (tmp_path / "pngs").mkdir()
    _, paths = digits_test_pngs(tmp_path / "pngs", 12)
    tail = torch.jit.load(str(folder / "tail.pt"))
    key = live_stack.torchserve.keys().inference
    for runtime in ("torch", "onnxruntime"):
        url = measured["inference_url"]
        with EdgeClient(folder / "head.pt", url, encoding="fp32", runtime=runtime, inference_key=key) as client:
            pred = client.predict_files(paths, top_k=1)
            x = client.preprocess(paths)
            with torch.inference_mode():
                local = tail(client.head(x)).argmax(1).tolist()
        assert [p[0]["class"] for p in pred.predictions] == local, runtime
        assert pred.predictions[0][0]["name"].startswith("digit-")


@pytest.mark.kafka
@pytest.mark.torchserve
def test_a_bad_program_upload_answers_422_naming_the_problem(live_stack, tmp_path: Path) -> None:
    bad = export(Tokens(), tmp_path / "tokens.pt2")
    with open(bad, "rb") as fh:
        files = {"file": ("tokens.pt2", fh)}
        r = requests.post(live_stack.analyzer_url + "/v1/models", files=files, headers=live_stack.headers(), timeout=60)
    assert r.status_code == 422
    assert "isplit needs classification logits" in r.text and "tokens.pt2" in r.text


@pytest.mark.slow
def test_densenet121_program_goes_through_cuts_retraining_and_export(tmp_path: Path) -> None:
    """A torchvision family the zoo lacks, at 32 px on a small slice (the lighter local path)."""
    torch.manual_seed(0)
    net = models.densenet121(num_classes=10)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=3, padding=1, bias=False)
    path = export(net, tmp_path / "densenet.pt2")
    model, info = load_model(path)
    points = find_cut_points(model, (1, 32, 32))
    names = [p.module for p in points]
    assert "features.denseblock1" in names and "features.transition2" in names
    data = load_dataset("digits", "train").subset(None, 32)
    info = info.model_copy(update={"class_names": data.class_names})
    outcome = retrain_split(model, info, "features.transition1", data, data, BottleneckSpec(epochs=1, batch_size=16))
    export_pair(outcome.pair, info, tmp_path / "cand", {"candidate_id": "densenet"})
    x = torch.rand(4, 1, 32, 32)
    torch_client = EdgeClient(tmp_path / "cand" / "head.pt", "http://127.0.0.1:9/unused")
    onnx_client = EdgeClient(tmp_path / "cand" / "head.onnx", "http://127.0.0.1:9/unused", runtime="onnxruntime")
    tail = torch.jit.load(str(tmp_path / "cand" / "tail.pt"))
    with torch.inference_mode():
        torch.testing.assert_close(onnx_client.head(x), torch_client.head(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(tail(torch_client.head(x)), outcome.pair(x), atol=1e-4, rtol=1e-4)
