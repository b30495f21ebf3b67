"""The tail-serving gateway (``python -m isplit.gateway``) in front of a real TorchServe with
token authorization on: only the release keys get in, each only into its own API; accepted
requests reach TorchServe with its own keys; /ping is open; keys rotate without a restart;
oversized bodies are refused before they are read."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from isplit import torchserve as ts
from isplit import wire
from isplit.dev import REPO
from isplit.dev.torchserve import free_ports
from tests.fixtures.services import ServiceProcess
from tests.test_tail_serving import _make_tail

pytestmark = pytest.mark.torchserve

MAX_BODY = 1024 * 1024


@dataclass
class Gateway:
    inference: str
    management: str
    keys_dir: Path
    service: ServiceProcess

    def key(self, api: str) -> str:
        return (self.keys_dir / f"{api}-key").read_text().strip()

    def as_(self, api: str) -> dict[str, str]:
        return ts.auth_headers(self.key(api))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), os.environ.get("PYTHONPATH", "")])}


def _write_keys(keys_dir: Path) -> Path:
    for api in ("inference", "management"):
        (keys_dir / f"{api}-key").write_text(f"{api}-{uuid.uuid4().hex}\n")
    return keys_dir


def _start_gateway(keys_dir: Path, key_file: Path, inference_upstream: str, management_upstream: str) -> Gateway:
    inference_port, management_port = free_ports(2)
    args = [
        "-m", "isplit.gateway", "--keys-dir", str(keys_dir), "--torchserve-key-file", str(key_file),
        "--inference-listen", f"127.0.0.1:{inference_port}", "--inference-upstream", inference_upstream,
        "--management-listen", f"127.0.0.1:{management_port}", "--management-upstream", management_upstream,
        "--max-body-bytes", str(MAX_BODY), "--header-timeout", "2",
    ]  # fmt: skip
    service = ServiceProcess("python", _env(), keys_dir / "gateway.log", args)
    management = f"http://127.0.0.1:{management_port}"
    service.start(health_url=management + "/models", timeout_s=30)  # up: a 401 without a key
    return Gateway(f"http://127.0.0.1:{inference_port}", management, keys_dir, service)


@contextmanager
def running(g: Gateway) -> Iterator[Gateway]:
    try:
        yield g
    finally:
        g.service.terminate(timeout_s=15)


@pytest.fixture(scope="module")
def gateway(torchserve, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    keys_dir = _write_keys(tmp_path_factory.mktemp("gateway-keys"))
    g = _start_gateway(keys_dir, torchserve.key_file, torchserve.inference_url, torchserve.management_url)
    with running(g):
        yield g


@pytest.fixture(scope="module")
def tail(
    gateway: Gateway, torchserve, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, torch.nn.Module]]:
    """A tail registered *through the gateway* with the release management key."""
    name = f"isplit-gw-tail-{uuid.uuid4().hex[:8]}"
    tail_pt, tail_json, local = _make_tail(tmp_path_factory.mktemp("gw-tail"), name)
    mar = ts.build_mar(tail_pt, tail_json, name, "1.0", torchserve.model_store)
    ts.register(gateway.management, mar.name, name, batch_size=4, max_batch_delay_ms=5, key=gateway.key("management"))
    yield name, local
    ts.unregister(gateway.management, name, key=gateway.key("management"))
    mar.unlink(missing_ok=True)


def test_ping_is_open_and_reports_torchserve_health(gateway: Gateway) -> None:
    r = requests.get(gateway.inference + "/ping", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "Healthy"


@pytest.mark.parametrize("api", ["inference", "management"])
def test_no_key_wrong_key_and_the_other_apis_key_get_401(gateway: Gateway, api: str) -> None:
    base = getattr(gateway, api)
    path = "/models" if api == "management" else "/predictions/anything"
    method = requests.get if api == "management" else requests.post
    other = "management" if api == "inference" else "inference"
    for headers, reason in [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer nope"}, f"invalid key for the {api} API"),
        (gateway.as_(other), f"invalid key for the {api} API"),
        ({"Authorization": "Basic " + gateway.key(api)}, f"invalid key for the {api} API"),
    ]:
        r = method(base + path, headers=headers, timeout=10)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"] == reason


def test_management_ping_is_not_open(gateway: Gateway) -> None:
    assert requests.get(gateway.management + "/ping", timeout=10).status_code == 401


def test_predictions_through_the_gateway_equal_the_local_tail(gateway: Gateway, tail) -> None:
    name, local = tail
    codes = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    answer = ts.predict(gateway.inference, name, wire.encode(codes, "fp32"), key=gateway.key("inference"), top_k=10)
    with torch.inference_mode():
        expected = torch.softmax(local(codes), dim=1)
    got = torch.tensor(
        [[p["probability"] for p in sorted(row, key=lambda p: p["class"])] for row in answer["predictions"]]
    )
    assert torch.allclose(got, expected, atol=1e-4)


def test_handler_errors_pass_through(gateway: Gateway, tail) -> None:
    name, _ = tail
    r = requests.post(ts.inference_url(gateway.inference, name), data=b"not a tensor",
                      headers=gateway.as_("inference"), timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text


def test_torchserve_still_refuses_files_outside_the_model_store(gateway: Gateway) -> None:
    r = requests.post(gateway.management + "/models", params={"url": "file:///etc/passwd"},
                      headers=gateway.as_("management"), timeout=30)  # fmt: skip
    assert 400 <= r.status_code < 500 and r.status_code != 401, r.text


def test_a_rotated_key_takes_effect_without_a_restart(gateway: Gateway) -> None:
    old = gateway.key("management")
    assert requests.get(gateway.management + "/models", headers=gateway.as_("management"), timeout=10).ok
    new = f"rotated-{uuid.uuid4().hex}"
    path = gateway.keys_dir / "management-key"
    path.write_text(new + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a new mtime even within one tick
    try:
        assert requests.get(gateway.management + "/models", headers=ts.auth_headers(old), timeout=10).status_code == 401
        assert requests.get(gateway.management + "/models", headers=ts.auth_headers(new), timeout=10).ok
    finally:
        path.write_text(old + "\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))


def test_a_body_over_the_limit_gets_413_before_it_is_sent(gateway: Gateway, tail) -> None:
    name, _ = tail
    port = int(gateway.inference.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (f"POST /predictions/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.key('inference')}\r\n"
                f"Content-Length: {10 * MAX_BODY}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert f"request body of {10 * MAX_BODY} bytes exceeds the limit of {MAX_BODY} bytes".encode() in answer


def test_before_torchserve_writes_its_keys_requests_get_503(torchserve, tmp_path: Path) -> None:
    keys_dir = _write_keys(tmp_path)
    with running(_start_gateway(keys_dir, tmp_path / "key_file.json", torchserve.inference_url,
                                torchserve.management_url)) as g:  # fmt: skip
        r = requests.get(g.management + "/models", headers=g.as_("management"), timeout=10)
        assert r.status_code == 503 and r.json()["detail"] == "TorchServe has not started yet (no key file)"
        assert requests.get(g.inference + "/ping", timeout=10).status_code == 503
        (tmp_path / "key_file.json").write_text(torchserve.key_file.read_text())
        assert requests.get(g.management + "/models", headers=g.as_("management"), timeout=10).ok


def test_a_missing_release_key_is_exit_2_with_one_line(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "isplit.gateway", "--keys-dir", str(tmp_path), "--torchserve-key-file", "x.json"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: no inference key: {tmp_path / 'inference-key'} does not exist"
    ]


def test_bad_request_lines_get_4xx_not_a_crash(gateway: Gateway) -> None:
    port = int(gateway.inference.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    assert requests.get(gateway.inference + "/ping", timeout=10).json() == json.loads('{"status": "Healthy"}')


def test_the_gateway_does_not_load_torch() -> None:
    """The chart gives the gateway container 512 MiB; importing torch alone peaks above that."""
    probe = "import sys, isplit.gateway; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
