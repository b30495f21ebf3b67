"""Tail serving on a real TorchServe: the .mar, registration, the handler, its metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from isplit import torchserve as ts
from isplit import wire
from isplit.dev import REPO
from isplit.dev.torchserve import private_env, private_torchserve, read_state, run_script

pytestmark = pytest.mark.torchserve

CODE_SHAPE = (4, 4, 4)
CLASS_NAMES = [f"class-{i}" for i in range(10)]


@dataclass(frozen=True)
class ServedTail:
    name: str
    mar: Path
    local: torch.jit.ScriptModule
    inference_url: str
    management_url: str
    metrics_url: str
    keys: ts.TorchServeKeys


def _make_tail(directory: Path, model_name: str) -> tuple[Path, Path, torch.jit.ScriptModule]:
    """A tiny TorchScript tail, (N, 4, 4, 4) codes -> (N, 10) logits, and its tail.json."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # new torch deprecates torch.jit; it is still the contract
        scripted = torch.jit.trace(net, torch.zeros(1, *CODE_SHAPE))
    tail_pt, tail_json = directory / "tail.pt", directory / "tail.json"
    scripted.save(str(tail_pt))
    meta = {
        "schema_version": 1,
        "model_name": model_name,
        "analysis_id": "test-analysis",
        "candidate_id": "test-candidate",
        "cut": "features.3",
        "code_shape": list(CODE_SHAPE),
        "class_names": CLASS_NAMES,
    }
    tail_json.write_text(json.dumps(meta))
    return tail_pt, tail_json, scripted


@pytest.fixture(scope="module")
def served_tail(torchserve, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedTail]:
    """The tiny tail, archived into the server's model store and registered under a fresh name."""
    name = f"isplit-test-tail-{uuid.uuid4().hex[:8]}"
    tail_pt, tail_json, local = _make_tail(tmp_path_factory.mktemp("tail"), name)
    mar = ts.build_mar(tail_pt, tail_json, name, "1.0", torchserve.model_store)
    keys = torchserve.keys()
    ts.register(torchserve.management_url, mar.name, name, batch_size=8, max_batch_delay_ms=20, key=keys.management)
    yield ServedTail(
        name, mar, local, torchserve.inference_url, torchserve.management_url, torchserve.metrics_url, keys
    )
    ts.unregister(torchserve.management_url, name, key=torchserve.keys().management)
    mar.unlink(missing_ok=True)


def _codes(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *CODE_SHAPE, generator=torch.Generator().manual_seed(seed))


def _local_probabilities(tail: ServedTail, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(tail.local(codes), dim=1)


def _predict(tail: ServedTail, payload: bytes, **kw) -> dict:
    return ts.predict(tail.inference_url, tail.name, payload, key=tail.keys.inference, **kw)


def _post(tail: ServedTail, body: bytes, **headers: str) -> requests.Response:
    headers = {**headers, **ts.auth_headers(tail.keys.inference)}
    return requests.post(ts.inference_url(tail.inference_url, tail.name), data=body, headers=headers, timeout=30)


def _metric_samples(tail: ServedTail, name: str) -> list[float]:
    """Values of the samples of ``name`` labelled with this tail's model name."""
    text = requests.get(f"{tail.metrics_url}/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.MULTILINE)
    return [float(value) for labels, value in pattern.findall(text) if tail.name in labels]


def _wait_for_metric(tail: ServedTail, name: str, at_least: float, timeout_s: float = 15) -> list[float]:
    """Backend metrics reach :8082 asynchronously (parsed from the worker's log); poll for them."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _metric_samples(tail, name)
        if samples and max(samples) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.25)


# --- packaging and registration ----------------------------------------------------------------


def test_mar_holds_tail_pt_tail_json_and_the_handler(served_tail: ServedTail) -> None:
    with zipfile.ZipFile(served_tail.mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert {"tail.pt", "tail.json", "isplit_tail_handler.py"} <= names
    assert manifest["model"]["modelVersion"] == "1.0"
    assert manifest["model"]["serializedFile"] == "tail.pt"


def test_build_mar_leaves_a_same_named_directory_in_tmpdir_alone(tmp_path: Path, monkeypatch) -> None:
    # torch-model-archiver assembles in $TMPDIR/<model_name> and deletes what is there first.
    tail_pt, tail_json, _ = _make_tail(tmp_path, "tmpdir-probe")
    (tmp_path / "tmpdir-probe").mkdir()
    (tmp_path / "tmpdir-probe" / "keep.txt").write_text("mine")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    mar = ts.build_mar(tail_pt, tail_json, "tmpdir-probe", "1.0", tmp_path / "store")
    assert mar == tmp_path / "store" / "tmpdir-probe.mar" and mar.is_file()
    assert (tmp_path / "tmpdir-probe" / "keep.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["tmpdir-probe.mar"]


def test_register_again_is_a_no_op(served_tail: ServedTail) -> None:
    ts.register(
        served_tail.management_url,
        served_tail.mar.name,
        served_tail.name,
        version="1.0",
        key=served_tail.keys.management,
    )
    described = requests.get(
        f"{served_tail.management_url}/models/{served_tail.name}/all",
        headers=ts.auth_headers(served_tail.keys.management),
        timeout=10,
    ).json()
    assert [entry["modelVersion"] for entry in described] == ["1.0"]
    assert described[0]["batchSize"] == 8


# --- predictions -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_prediction_matches_the_local_tail(served_tail: ServedTail, encoding: str) -> None:
    codes = _codes(3, seed=1)
    payload = wire.encode(codes, encoding)
    answer = _predict(served_tail, payload)
    # The server runs the tail on exactly what the wire carried.
    expected = _local_probabilities(served_tail, wire.decode(payload))
    assert answer["model"] == served_tail.name
    assert len(answer["predictions"]) == 3
    for per_image, probabilities in zip(answer["predictions"], expected, strict=True):
        top = torch.topk(probabilities, 5)
        assert [p["class"] for p in per_image] == top.indices.tolist()
        assert [p["name"] for p in per_image] == [CLASS_NAMES[i] for i in top.indices.tolist()]
        assert [p["probability"] for p in per_image] == pytest.approx(top.values.tolist(), abs=1e-5)
    if encoding == "fp32":
        assert [p[0]["class"] for p in answer["predictions"]] == expected.argmax(1).tolist()


def test_unbatched_code_gets_one_top_k_list(served_tail: ServedTail) -> None:
    code = _codes(1, seed=2)[0]
    answer = _predict(served_tail, wire.encode(code, "fp16"), top_k=3)
    assert [p["class"] for p in answer["predictions"]] == torch.topk(
        _local_probabilities(served_tail, wire.decode(wire.encode(code, "fp16")).unsqueeze(0))[0], 3
    ).indices.tolist()


def test_top_k_header_bounds_the_classes_returned(served_tail: ServedTail) -> None:
    answer = _predict(served_tail, wire.encode(_codes(1, seed=3)), top_k=10)
    probabilities = [p["probability"] for p in answer["predictions"][0]]
    assert len(probabilities) == 10
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_json_tensor_body_is_accepted_for_debugging(served_tail: ServedTail) -> None:
    codes = _codes(1, seed=4)
    response = requests.post(
        ts.inference_url(served_tail.inference_url, served_tail.name),
        json={"tensor": codes.tolist()},
        headers=ts.auth_headers(served_tail.keys.inference),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["class"] == int(_local_probabilities(served_tail, codes).argmax())


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served_tail: ServedTail) -> None:
    codes = _codes(32, seed=5)
    payloads = [wire.encode(codes[i : i + 1], "fp16") for i in range(len(codes))]
    passes_before, codes_before = _batch_totals(served_tail)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda p: _predict(served_tail, p), payloads))
    expected = _local_probabilities(served_tail, torch.cat([wire.decode(p) for p in payloads])).argmax(1)
    assert [a["predictions"][0][0]["class"] for a in answers] == expected.tolist()
    _wait_for_metric(served_tail, "isplit_tail_batch_size_sum", codes_before + 32)
    passes, codes_served = _batch_totals(served_tail)
    assert codes_served - codes_before == 32
    assert passes - passes_before < 32  # some forward pass held more than one request's code


def _batch_totals(tail: ServedTail) -> tuple[float, float]:
    """(forward passes, codes) so far, from the isplit_tail_batch_size histogram."""
    count, total = (
        _metric_samples(tail, "isplit_tail_batch_size_count"),
        _metric_samples(tail, "isplit_tail_batch_size_sum"),
    )
    return (count[0] if count else 0.0), (total[0] if total else 0.0)


# --- bad requests ------------------------------------------------------------------------------


def test_malformed_payload_gets_400_with_the_reason_and_the_next_request_succeeds(served_tail: ServedTail) -> None:
    good = wire.encode(_codes(1, seed=6))
    response = _post(served_tail, good[:-5])
    assert response.status_code == 400
    assert response.json()["message"] == f"truncated message: expected {len(good)} bytes, got {len(good) - 5}"
    assert "truncated message" in response.reason
    with pytest.raises(ts.TorchServeError, match="neither an isplit wire message") as refused:
        _predict(served_tail, b"GIF89a" + bytes(40))
    assert refused.value.status == 400
    assert _post(served_tail, good).status_code == 200


def test_wrong_code_shape_gets_400_naming_both_shapes(served_tail: ServedTail) -> None:
    response = _post(served_tail, wire.encode(torch.zeros(2, 8, 4, 4)))
    assert response.status_code == 400
    assert response.json()["message"] == (
        "shape mismatch: got (2, 8, 4, 4), expected (N, 4, 4, 4) with N >= 1 or (4, 4, 4)"
    )


def test_bad_top_k_gets_400(served_tail: ServedTail) -> None:
    response = _post(served_tail, wire.encode(_codes(1, seed=7)), **{"X-Isplit-Top-K": "11"})
    assert response.status_code == 400
    assert "X-Isplit-Top-K must be an integer in [1, 10], got '11'" in response.json()["message"]


def test_a_bad_request_does_not_fail_the_others_in_its_batch(served_tail: ServedTail) -> None:
    bodies = [wire.encode(_codes(1, seed=8 + i)) for i in range(8)]
    bodies[3] = bodies[3][:20]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda b: _post(served_tail, b).status_code, bodies))
    assert statuses == [200, 200, 200, 400, 200, 200, 200, 200]


# --- metrics -----------------------------------------------------------------------------------


def test_custom_metrics_are_exported_in_prometheus_format(served_tail: ServedTail) -> None:
    assert _post(served_tail, b"ISPW").status_code == 400
    assert _post(served_tail, wire.encode(_codes(2, seed=20), "int8")).status_code == 200
    assert _wait_for_metric(served_tail, "isplit_tail_bad_requests_total", 1)[0] >= 1
    for name in (
        "isplit_tail_decode_seconds_count",
        "isplit_tail_decode_seconds_sum",
        "isplit_tail_batch_size_count",
        "isplit_tail_payload_bytes_count",
        "isplit_tail_payload_bytes_sum",
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
    ):
        samples = _wait_for_metric(served_tail, name, 1e-12)
        assert samples and samples[0] > 0, f"{name} missing for {served_tail.name}"
    buckets = _metric_samples(served_tail, "isplit_tail_decode_seconds_bucket")
    assert len(buckets) > 1


# --- locked down -------------------------------------------------------------------------------


def test_management_and_inference_refuse_calls_without_their_key(served_tail: ServedTail) -> None:
    models = f"{served_tail.management_url}/models"
    assert requests.get(models, timeout=10).status_code == 400
    wrong = ts.auth_headers(served_tail.keys.inference)  # the inference key is not the management key
    assert requests.get(models, headers=wrong, timeout=10).status_code == 400
    assert requests.get(models, headers=ts.auth_headers(served_tail.keys.management), timeout=10).status_code == 200
    with pytest.raises(ts.TorchServeError, match="Token Authorization failed") as refused:
        ts.predict(served_tail.inference_url, served_tail.name, wire.encode(_codes(1, seed=9)))
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "file:///tmp/elsewhere.mar", "http://127.0.0.1:9/tail.mar"],
    ids=["passwd", "mar", "http"],
)
def test_registration_from_outside_the_model_store_is_refused(served_tail: ServedTail, torchserve, url: str) -> None:
    response = requests.post(
        f"{served_tail.management_url}/models",
        params={"url": url, "model_name": "isplit-intruder"},
        headers=ts.auth_headers(served_tail.keys.management),
        timeout=30,
    )
    assert response.status_code == 404, response.text
    assert "does not match any allowed URL" in response.json()["message"]
    assert not (torchserve.model_store / "passwd").exists()


def test_nested_json_body_gets_400_not_503(served_tail: ServedTail) -> None:
    deep = _post(served_tail, b"[" * 100000 + b"]" * 100000, **{"Content-Type": "application/json"})
    assert deep.status_code == 400, deep.text
    assert "nested too deeply" in deep.json()["message"]
    assert _predict(served_tail, wire.encode(_codes(1, seed=5)))["model"] == served_tail.name


def test_a_restarted_torchserve_serves_its_tails_again(tmp_path: Path) -> None:
    name = f"isplit-test-restart-{uuid.uuid4().hex[:8]}"
    (tmp_path / "tail").mkdir()
    tail_pt, tail_json, local = _make_tail(tmp_path / "tail", name)
    codes = _codes(2, seed=6)
    with private_torchserve(tmp_path / "ts") as server:
        mar = ts.build_mar(tail_pt, tail_json, name, "1.0", server.model_store)
        ts.register(server.management_url, mar.name, name, key=server.keys().management)
        before = ts.predict(server.inference_url, name, wire.encode(codes), key=server.keys().inference)
        old_keys = server.keys()
        env = private_env(tmp_path / "ts")
        assert run_script("stop", env).returncode == 0
        restarted = run_script("start", env)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        again = read_state(tmp_path / "ts" / "run")
        assert again is not None and again.keys() != old_keys  # new keys at each start
        after = ts.predict(again.inference_url, name, wire.encode(codes), key=again.keys().inference)
    assert after["predictions"] == before["predictions"]
    assert [p[0]["class"] for p in after["predictions"]] == local(codes).argmax(1).tolist()


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def _nobody_can_run(python: Path) -> bool:
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/bin/sh", "-c", '"$0" -c 1']
    return subprocess.run([*as_nobody, str(python)], capture_output=True, timeout=60).returncode == 0


def _system_python_of_the_venvs_version() -> Path | None:
    version = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", 'import sys; print("%d.%d" % sys.version_info[:2])'],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    found = shutil.which(f"python{version}", path="/usr/local/bin:/usr/bin:/bin")
    return Path(found) if found else None


VENV_PYTHON_SERVES = os.geteuid() != 0 or _nobody_can_run(REPO / ".venv" / "bin" / "python")
SYSTEM_PYTHON = _system_python_of_the_venvs_version()


@pytest.mark.skipif(os.geteuid() != 0, reason="started by a normal user, TorchServe runs as that user")
@pytest.mark.skipif(
    not VENV_PYTHON_SERVES and (SYSTEM_PYTHON is None or not _nobody_can_run(SYSTEM_PYTHON)),
    reason="nobody may run the venv's interpreter (under a directory only root may enter), and there is "
    "no system Python of its version: scripts/torchserve falls back to root with a warning",
)
def test_started_by_root_torchserve_and_its_workers_are_not_root(served_tail: ServedTail, torchserve) -> None:
    state = (torchserve.key_file.parent / "torchserve.env").read_text()
    frontend = int(re.search(r"^ISPLIT_TORCHSERVE_PID=(\d+)$", state, re.M).group(1))  # type: ignore[union-attr]
    # The JVM starts workers from any of its threads: each thread lists its own children.
    children = [p for task in Path(f"/proc/{frontend}/task").iterdir() for p in (task / "children").read_text().split()]
    workers = [int(p) for p in children if b"model_service_worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert workers, "no model worker under the frontend"
    uids = {pid: _uid(pid) for pid in (frontend, *workers)}
    assert all(uid != 0 for uid in uids.values()), uids
    assert torchserve.key_file.stat().st_uid == uids[frontend]  # TorchServe wrote its keys as that user
    if not VENV_PYTHON_SERVES:  # here the workers run on the runner venv made from the system's Python
        runner = REPO / ".venv" / "torchserve-runner" / "bin" / "python"
        assert all(str(runner).encode() in Path(f"/proc/{p}/cmdline").read_bytes() for p in workers)
