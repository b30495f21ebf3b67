"""Hostile clients against a real analyzer process over real sockets: oversized and endless
uploads are refused as the bytes arrive with bounded disk use, slow headers and slow bodies
are cut off without slowing ``/healthz``, and a crafted checkpoint is refused without the
memory of the model its metadata claims."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from tests.test_analyzer import Analyzer

pytestmark = pytest.mark.kafka

LIMIT = 8 * 1024 * 1024  # ISPLIT_MAX_UPLOAD_BYTES of this module's analyzer
TIMEOUT_S = 2.0  # its header and body-idle timeouts


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str):
    base = tmp_path_factory.mktemp("limits")
    (base / "tmp").mkdir()
    service = Analyzer(
        base / "artifacts", kafka_bootstrap, base / "analyzer.log",
        ISPLIT_MAX_UPLOAD_BYTES=str(LIMIT), ISPLIT_HEADER_TIMEOUT_SECONDS=str(TIMEOUT_S),
        ISPLIT_BODY_IDLE_TIMEOUT_SECONDS=str(TIMEOUT_S), ISPLIT_BODY_TIMEOUT_SECONDS="20", TMPDIR=str(base / "tmp"),
    ).start()  # fmt: skip
    yield service
    service.proc.terminate()


def _connect(service: Analyzer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=30)


def _head(service: Analyzer, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_to_close(sock: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _upload_files_bytes(service: Analyzer) -> int:
    """Bytes in the files the analyzer holds open under its temp directory or its models
    directory (unlinked spool files included): what an upload costs on disk."""
    pid = service.proc.proc.pid  # type: ignore[union-attr]
    places = (service.proc.env["TMPDIR"], service.proc.env["ISPLIT_ARTIFACT_ROOT"])
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            size = os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
        if target.startswith(places):
            total += size
    return total


def _count_413(service: Analyzer) -> float:
    text = requests.get(service.url + "/metrics", timeout=10).text
    found = re.search(r'isplit_analyzer_http_request_seconds_count\{code="413",method="POST",route="/v1/models"\} (\S+)',
                      text)  # fmt: skip
    return float(found.group(1)) if found else 0.0


def test_a_declared_content_length_over_the_limit_gets_413_before_the_body_is_read(guarded):
    with _connect(guarded) as sock:
        sock.sendall(_head(guarded, "POST", "/v1/models", {
            **guarded.as_(), "Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(3 * 10**9)}))  # fmt: skip
        answer = _read_to_close(sock).decode()  # the head and the body may come in separate segments
    assert answer.startswith("HTTP/1.1 413")
    assert f"request body of 3000000000 bytes exceeds the limit of {LIMIT} bytes" in answer


def test_a_3_gb_chunked_upload_is_refused_within_the_first_megabytes_with_bounded_disk(guarded):
    """No Content-Length: the streamed count stops the body; nothing near 3 GB is sent, and
    the analyzer never holds more than the limit in (spooled or copied) files."""
    before_413 = _count_413(guarded)
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _upload_files_bytes(guarded))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sent, answer, start = 0, b"", time.monotonic()
    chunk = os.urandom(64 * 1024)
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.pt\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
    with _connect(guarded) as sock:
        sock.sendall(_head(guarded, "POST", "/v1/models", {
            **guarded.as_(), "Content-Type": "multipart/form-data; boundary=b", "Transfer-Encoding": "chunked"}))  # fmt: skip
        sock.sendall(b"%x\r\n%s\r\n" % (len(body), body))
        try:
            while sent < 3 * 10**9:
                if select.select([sock], [], [], 0)[0]:
                    time.sleep(0.2)
                    answer = sock.recv(65536)
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server closed the connection after answering
            with contextlib.suppress(OSError):
                answer = sock.recv(65536)
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    stop.set()
    watcher.join()
    assert sent < LIMIT + 16 * 1024 * 1024, f"{sent} bytes went out before the refusal"  # + socket buffers
    assert elapsed < 30
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert _count_413(guarded) == before_413 + 1  # the refusal the server answered, whatever the client read
    assert peak[0] <= LIMIT + 1024 * 1024, f"the analyzer held {peak[0]} bytes of files"
    assert not list(Path(guarded.proc.env["ISPLIT_ARTIFACT_ROOT"], "models").glob("*.upload"))
    print(
        f"\n3 GB chunked upload: refused after {sent / 2**20:.1f} MiB sent in {elapsed:.2f} s; "
        f"peak open-file bytes {peak[0] / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)"
    )


def _vm_hwm_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_a_checkpoint_declaring_width_4_is_refused_quickly_without_building_the_model(
    guarded, digits_checkpoint: Path, tmp_path: Path
):
    ckpt = torch.load(digits_checkpoint, weights_only=True)
    ckpt["info"]["width"] = 4.0  # a VGG11 of ~150 M parameters; the tensors are the 0.25-wide ones
    crafted = tmp_path / "wide.pt"
    torch.save(ckpt, crafted)
    pid = guarded.proc.proc.pid  # type: ignore[union-attr]
    # Warm up the upload path (imports, first model on the meta device) with a sound upload.
    with open(digits_checkpoint, "rb") as fh:
        assert guarded.post("/v1/models", files={"file": ("m.pt", fh)}).status_code == 201
    peak_before = _vm_hwm_kib(pid)
    start = time.monotonic()
    with open(crafted, "rb") as fh:
        r = guarded.post("/v1/models", files={"file": ("wide.pt", fh)})
    elapsed = time.monotonic() - start
    grown_mib = (_vm_hwm_kib(pid) - peak_before) / 1024
    print(f"\nwidth-4.0 checkpoint ({crafted.stat().st_size / 2**20:.1f} MiB) refused in {elapsed:.2f} s, "
          f"peak RSS grew {grown_mib:.0f} MiB")  # fmt: skip
    assert r.status_code == 422 and "width 4.0" in r.json()["detail"]
    assert grown_mib < 100  # building it would allocate ~600 MiB
    assert elapsed < 10


def _slow_sockets(service: Analyzer, count: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = _connect(service)
        sock.sendall(payload)
        socks.append(sock)
    return socks


def _closed_or_refused(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server said before closing (b"" for a bare close), None if still open."""
    sock.settimeout(max(0.0, deadline - time.monotonic()))
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except OSError:
        return b""


def _healthz_latencies(service: Analyzer, n: int = 20) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert requests.get(service.url + "/healthz", timeout=10).status_code == 200
        out.append(time.perf_counter() - t0)
    return out


def test_slow_bodies_and_slow_headers_are_cut_off_and_healthz_stays_fast(guarded):
    body_head = _head(guarded, "POST", "/v1/analyses",
                      {**guarded.as_(), "Content-Type": "application/json", "Content-Length": "1000"}) + b'{"model'  # fmt: skip
    slow_bodies = _slow_sockets(guarded, 200, body_head)
    slow_headers = _slow_sockets(guarded, 200, b"POST /v1/analyses HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        first = _healthz_latencies(guarded, 1)[0]  # behind the burst of 400 new connections
        time.sleep(0.5)
        latencies = _healthz_latencies(guarded)
        print(f"\n/healthz right after opening 400 slow connections: {first * 1000:.0f} ms; while they are held: "
              f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")  # fmt: skip
        assert first < 5.0
        assert statistics.median(latencies) < 0.2 and max(latencies) < 1.0
        deadline = time.monotonic() + TIMEOUT_S + 5
        bodies = [_closed_or_refused(s, deadline) for s in slow_bodies]
        headers = [_closed_or_refused(s, deadline) for s in slow_headers]
    finally:
        for sock in slow_bodies + slow_headers:
            sock.close()
    assert all(b is not None and (b == b"" or b.startswith(b"HTTP/1.1 408")) for b in bodies)
    assert sum(1 for b in bodies if b and b.startswith(b"HTTP/1.1 408")) >= len(bodies) // 2
    assert all(h == b"" for h in headers), "a connection without complete headers stayed open"
    assert max(_healthz_latencies(guarded, 5)) < 1.0
