"""The edge client against a real TorchServe: SDK, ``isplit edge predict``, and its errors.

A real head/tail pair is built once per module: the session's narrow VGG11 on digits, a
bottleneck retrained at ``features.5`` for two epochs on 300 images, exported, archived into
the TorchServe fixture's model store and registered.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from isplit import IsplitError, wire
from isplit import torchserve as ts
from isplit.analysis import run_analysis
from isplit.bottleneck import make_bottleneck
from isplit.checkpoint import load_model
from isplit.cli import main
from isplit.data import load_dataset
from isplit.edge import EdgeClient
from isplit.export import export_pair
from isplit.messages import BottleneckSpec
from isplit.plan import DeploymentSpec, MeasuredCut, load_device_measurement, plan_analysis, resolve_deployment
from isplit.retrain import count_flops, retrain_split

pytestmark = pytest.mark.torchserve

CUT = "features.5"
N_IMAGES = 4
TIMING_LINE = re.compile(
    r"^head \d+\.\d ms \| encode \d+\.\d\d ms \((?P<encoding>[\w-]+)\) \| sent (?P<bytes>\d+) B \| "
    r"network\+tail \d+\.\d ms \| total \d+\.\d ms$",
    re.MULTILINE,
)
PROFILE_ROUNDS = 5  # profile, then client calls, in turns
REPEATS = 6  # timed calls per round, for the profile's heads and for the client


@dataclass(frozen=True)
class ServedPair:
    head_pt: Path
    tail_pt: Path
    checkpoint: Path
    endpoint: str
    code_shape: tuple[int, ...]
    images: list[Path]
    inference_key: str


@pytest.fixture(scope="module")
def served_pair(torchserve, digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedPair]:
    """A retrained digits head/tail pair: head on disk, tail registered; four real test PNGs."""
    work = tmp_path_factory.mktemp("edge")
    model, info = load_model(digits_checkpoint)
    train = load_dataset("digits", "train").subset(None, 300)
    test = load_dataset("digits", "test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: 2 threads contend (10x slower)
    try:
        outcome = retrain_split(
            model, info, CUT, train, test.subset(None, 100), BottleneckSpec(epochs=2, lr=1e-2, batch_size=32)
        )
    finally:
        torch.set_num_threads(threads)
    name = f"isplit-test-edge-{uuid.uuid4().hex[:8]}"
    meta = {"model_name": name, "analysis_id": "test-edge", "candidate_id": name, "dataset": "digits"}
    paths = export_pair(outcome.pair, info, work / "pair", meta)
    mar = ts.build_mar(paths["tail.pt"], paths["tail.json"], name, "1.0", torchserve.model_store)
    ts.register(
        torchserve.management_url, mar.name, name, batch_size=4, max_batch_delay_ms=1, key=torchserve.keys().management
    )
    images = []
    for i in range(N_IMAGES):  # 8x8 uint8 digits, saved as the edge would receive them
        path = work / f"digit-{i}-label-{int(test.labels[i])}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(path)
        images.append(path)
    yield ServedPair(
        head_pt=paths["head.pt"],
        tail_pt=paths["tail.pt"],
        checkpoint=digits_checkpoint,
        endpoint=ts.inference_url(torchserve.inference_url, name),
        code_shape=tuple(outcome.pair.code_shape),
        images=images,
        inference_key=torchserve.keys().inference,
    )
    ts.unregister(torchserve.management_url, name, key=torchserve.keys().management)
    mar.unlink(missing_ok=True)


def _local_split(pair: ServedPair, client: EdgeClient, encoding: str) -> torch.Tensor:
    """Probabilities ``(N, K)`` of head + wire round trip + tail run here."""
    head, tail = torch.jit.load(str(pair.head_pt)), torch.jit.load(str(pair.tail_pt))
    with torch.inference_mode():
        code = wire.decode(wire.encode(head(client.preprocess(pair.images)), encoding))
        return torch.softmax(tail(code), dim=1)


def _isplit(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "isplit"), "edge", "predict", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster on a shared machine
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _stub_tail(answer: Callable[[bytes], tuple[int, bytes]]) -> Iterator[str]:
    """A tail on a free local port answering each POST body with ``answer(body)``: (status,
    JSON body). Yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            status, reply = answer(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predictions/stub"
    finally:
        server.shutdown()
        server.server_close()


# --- the SDK -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["fp16", "int8"])
def test_predict_files_matches_head_and_tail_run_locally(served_pair: ServedPair, encoding: str) -> None:
    with EdgeClient(
        served_pair.head_pt, served_pair.endpoint, encoding=encoding, inference_key=served_pair.inference_key
    ) as client:
        out = client.predict_files(served_pair.images, top_k=3)
        expected = _local_split(served_pair, client, encoding)
    assert len(out.predictions) == N_IMAGES
    for served, probabilities in zip(out.predictions, expected, strict=True):
        top = torch.topk(probabilities, 3)
        assert [p["class"] for p in served] == top.indices.tolist()
        assert [p["name"] for p in served] == [str(i) for i in top.indices.tolist()]
        assert [p["probability"] for p in served] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert out.bytes_sent == wire.encoded_nbytes((N_IMAGES, *served_pair.code_shape), encoding)


def test_timing_breakdown_is_positive_and_adds_up(served_pair: ServedPair) -> None:
    with EdgeClient(served_pair.head_pt, served_pair.endpoint, inference_key=served_pair.inference_key) as client:
        out = client.predict_files(served_pair.images)
    parts = (out.head_ms, out.encode_ms, out.network_tail_ms, out.extra["preprocess_ms"])
    assert all(ms > 0 for ms in parts)
    assert out.head_ms + out.encode_ms + out.network_tail_ms == pytest.approx(out.total_ms, rel=1e-6)


def test_server_errors_are_retried_and_bad_requests_are_not(served_pair: ServedPair) -> None:
    statuses = [503, 200]  # what the stub answers, in order; then 400 for ever
    seen: list[int] = []

    def answer(body: bytes) -> tuple[int, bytes]:
        status = statuses.pop(0) if statuses else 400
        seen.append(len(body))
        return status, b'{"message": "busy"}' if status != 200 else b'{"predictions": [[{"class": 1}]]}'

    with _stub_tail(answer) as url, EdgeClient(served_pair.head_pt, url, retries=1) as client:
        x = client.preprocess(served_pair.images[:1])
        assert client.predict_tensor(x).predictions == [[{"class": 1}]]
        assert len(seen) == 2
        with pytest.raises(IsplitError, match=r"answered 400: busy"):
            client.predict_tensor(x)
        assert len(seen) == 3


# --- the command line --------------------------------------------------------------------------


def test_cli_prints_predictions_timing_and_agreement_with_the_full_model(served_pair: ServedPair) -> None:
    done = _isplit(
        "--head", str(served_pair.head_pt), "--endpoint", served_pair.endpoint, "--encoding", "fp16",
        "--inference-key", served_pair.inference_key, "--compare-local", str(served_pair.checkpoint), *map(str, served_pair.images),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warnings either: the user sees predictions and timings only
    with EdgeClient(served_pair.head_pt, served_pair.endpoint, inference_key=served_pair.inference_key) as client:
        split = _local_split(served_pair, client, "fp16").argmax(1)
        full, _ = load_model(served_pair.checkpoint)
        with torch.inference_mode():
            agree = int((full(client.preprocess(served_pair.images)).argmax(1) == split).sum())
    for image, label in zip(served_pair.images, split.tolist(), strict=True):
        assert re.search(rf"^{re.escape(str(image))}: {label} \d\.\d{{3}}, ", done.stdout, re.MULTILINE), done.stdout
    timing = TIMING_LINE.search(done.stdout)
    assert timing and timing["encoding"] == "fp16", done.stdout
    assert int(timing["bytes"]) == wire.encoded_nbytes((N_IMAGES, *served_pair.code_shape), "fp16")
    assert f"agreement with the full model: {agree}/{N_IMAGES}\n" in done.stdout


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--encoding", "fp8"], "unknown encoding 'fp8'; choose one of fp32, fp16, int8, int8-channel"),
        (["missing.png"], "image missing.png does not exist"),
        (["--top-k", "11"], "answered 400: X-Isplit-Top-K must be an integer in [1, 10], got '11'"),
    ],
    ids=["unknown-encoding", "missing-image", "refused-by-the-tail"],
)
def test_cli_user_error_exits_2_with_one_line(
    served_pair: ServedPair, bad: list[str], message: str, capsys, monkeypatch
) -> None:
    # In-process (the subprocess test above covers the console script): an exception escaping
    # main() would fail this test, so exit 2 with one line means no traceback.
    monkeypatch.setenv("ISPLIT_INFERENCE_KEY", served_pair.inference_key)  # the flag's default
    images = [] if bad[-1].endswith(".png") else [str(served_pair.images[0])]
    assert main(["edge", "predict", "--head", str(served_pair.head_pt), "--endpoint", served_pair.endpoint,
                 *bad, *images]) == 2  # fmt: skip
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("isplit: error: ") and message in err, err


@pytest.mark.parametrize("key", [None, "not-the-key"], ids=["no-key", "wrong-key"])
def test_cli_without_the_inference_key_is_refused_with_one_line(served_pair: ServedPair, key, capsys, monkeypatch):
    monkeypatch.delenv("ISPLIT_INFERENCE_KEY", raising=False)
    flag = [] if key is None else ["--inference-key", key]
    args = ["edge", "predict", "--head", str(served_pair.head_pt), "--endpoint", served_pair.endpoint, *flag]
    assert main([*args, str(served_pair.images[0])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "answered 400: Token Authorization failed" in err, err


def test_cli_unreachable_endpoint_exits_2_after_retries(served_pair: ServedPair, capsys) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/predictions/nothing-here"
    args = ["edge", "predict", "--head", str(served_pair.head_pt), "--endpoint", url, "--retries", "2"]
    assert main([*args, str(served_pair.images[0])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"isplit: error: tail at {url} unreachable after 3 tries: connection failed ")
    assert "Connection refused" in err


# --- the measured device profile ---------------------------------------------------------------


def test_the_measured_device_profile_predicts_the_edge_clients_head_time(
    served_pair: ServedPair, tmp_path, capsys
) -> None:
    """``isplit edge profile`` on this machine, then the plan's head estimate for the served cut
    (its bottleneck encoder included) against the edge client's measured head time, within 50 %.

    The two are measured in turns in this process (a profile, then the client's calls, for
    ``PROFILE_ROUNDS`` rounds) and their medians compared, so a load that comes and goes on a
    shared machine slows both rather than only the one that ran while it lasted. The client's
    head time is taken before its request leaves, so its tail is a local stub: TorchServe's
    work on the same cores stays out of the comparison (the tests above cover TorchServe)."""
    result = run_analysis(served_pair.checkpoint, "digits", max_images=20, batch_size=20, device="cpu")
    shape = result.curve.point(CUT).output_shape
    encoder = make_bottleneck(shape, BottleneckSpec().compression_ratio).encoder.eval()
    encoder_flops = count_flops(encoder, torch.zeros(1, *shape))
    measured = {CUT: MeasuredCut(head_flops=result.costs.cut(CUT).head_flops + encoder_flops)}
    answer = b'{"predictions": [[{"class": 0}]]}'
    estimates: list[float] = []
    head_times: list[float] = []
    threads = torch.get_num_threads()
    try:
        # One thread for both (`edge profile --threads 1` sets it for this process): on a
        # shared 2-core machine a 2-thread head waits on whichever thread another process has
        # pushed off its core, tens of ms at random, for the profile and the client alike.
        with _stub_tail(lambda _body: (200, answer)) as url, EdgeClient(served_pair.head_pt, url) as client:
            x = client.preprocess(served_pair.images[:1])
            for i in range(PROFILE_ROUNDS):
                profile_path = tmp_path / f"device-{i}.json"
                assert main(["edge", "profile", "--weights", str(served_pair.checkpoint), "--threads", "1",
                             "--repeats", str(REPEATS), "--out", str(profile_path)]) == 0  # fmt: skip
                profile = load_device_measurement(profile_path)
                spec = DeploymentSpec(device_profile=profile, link="loopback")
                estimate = plan_analysis(result, resolve_deployment(spec), measured).cut(CUT)
                assert estimate.head_source == "measured"
                estimates.append(estimate.head_ms)
                client.predict_tensor(x)  # warm-up, as the profile warms each head up before timing it
                for _ in range(REPEATS):
                    time.sleep(profile.pause_ms / 1e3)  # the idle pause the profile timed its heads after
                    head_times.append(client.predict_tensor(x).head_ms)
    finally:
        torch.set_num_threads(threads)
    assert "GFLOP/s effective" in capsys.readouterr().out
    estimate_ms, head_ms = statistics.median(estimates), statistics.median(head_times)
    assert estimate_ms == pytest.approx(head_ms, rel=0.5), (estimates, head_times)
