"""ONNX heads: the trainer's export writes head.onnx (with the bottleneck encoder) beside the
TorchScript head, ONNX Runtime computes the same code on real images, and the tail answers the
same to an ONNX-encoded payload; `isplit export-head` writes any format for a candidate folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isplit import wire
from isplit.checkpoint import ModelInfo, sha256_file
from isplit.data import load_dataset
from isplit.edge import EdgeClient
from isplit.export import ONNX_OPSET, export_pair
from isplit.messages import BottleneckSpec
from isplit.retrain import retrain_split
from isplit.zoo import build_model
from tests.fixtures.stack import digits_test_pngs


def _candidate(arch: str, cut: str, out: Path) -> Path:
    """A real (briefly) retrained split of an untrained zoo model, exported into ``out``."""
    torch.manual_seed(0)
    kwargs = {"width": 0.25} if arch.startswith("vgg") else {}
    model = build_model(arch, num_classes=10, in_channels=1, input_size=32, **kwargs).eval()
    train = load_dataset("digits", "train").subset(None, 64)
    info = ModelInfo(
        arch=arch, num_classes=10, in_channels=1, input_size=32, class_names=train.class_names, mean=[0.3], std=[0.4]
    )
    outcome = retrain_split(model, info, cut, train, train, BottleneckSpec(epochs=1, batch_size=32))
    export_pair(outcome.pair, info, out, {"candidate_id": f"test-{arch}"})
    return out


@pytest.fixture(scope="module", params=[("vgg11", "features.10"), ("resnet18", "layer2.1")], ids=["vgg", "resnet"])
def candidate(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, cut = request.param
    return _candidate(arch, cut, tmp_path_factory.mktemp(arch))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return digits_test_pngs(tmp_path_factory.mktemp("pngs"), 16)[1]


def test_head_json_records_the_onnx_heads_opset_and_checksum(candidate: Path) -> None:
    meta = json.loads((candidate / "head.json").read_text())
    onnx_entry = meta["artifacts"]["onnx"]
    assert onnx_entry["opset"] == ONNX_OPSET
    assert onnx_entry["sha256"] == sha256_file(candidate / "head.onnx")
    assert onnx_entry["bytes"] == (candidate / "head.onnx").stat().st_size
    assert meta["artifacts"]["torchscript"]["sha256"] == sha256_file(candidate / "head.pt")


def test_onnx_runtime_code_equals_the_torch_heads_on_real_images(candidate: Path, images: list[Path]) -> None:
    torch_client = EdgeClient(candidate / "head.pt", "http://127.0.0.1:9/unused")
    onnx_client = EdgeClient(candidate / "head.onnx", "http://127.0.0.1:9/unused", runtime="onnxruntime")
    x = torch_client.preprocess(images)
    with torch.inference_mode():
        expected = torch_client.head(x)
    code = onnx_client.head(x)
    assert code.shape == expected.shape and list(code.shape[1:]) == torch_client.meta["code_shape"]
    torch.testing.assert_close(code, expected, atol=1e-4, rtol=0)


def test_the_tail_predicts_the_same_from_an_onnx_encoded_payload(candidate: Path, images: list[Path]) -> None:
    tail = torch.jit.load(str(candidate / "tail.pt"))
    torch_client = EdgeClient(candidate / "head.pt", "http://127.0.0.1:9/unused")
    onnx_client = EdgeClient(candidate / "head.pt", "http://127.0.0.1:9/unused", runtime="onnxruntime")
    x = torch_client.preprocess(images)
    with torch.inference_mode():
        via_torch = tail(wire.decode(wire.encode(torch_client.head(x), "fp32"))).argmax(1)
        via_onnx = tail(wire.decode(wire.encode(onnx_client.head(x), "fp32"))).argmax(1)
    assert via_onnx.tolist() == via_torch.tolist()


def test_a_tampered_onnx_head_is_refused(candidate: Path, tmp_path: Path) -> None:
    for name in ("head.json", "head.onnx"):
        (tmp_path / name).write_bytes((candidate / name).read_bytes())
    with open(tmp_path / "head.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(Exception, match="does not match the checksum"):
        EdgeClient(tmp_path / "head.onnx", "http://127.0.0.1:9/unused", runtime="onnxruntime")


def _isplit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "isplit.cli", *args], capture_output=True, text=True, timeout=600)


def test_export_head_writes_each_format_and_records_it(tmp_path: Path, images: list[Path]) -> None:
    folder = _candidate("vgg11", "features.6", tmp_path / "cand")
    (folder / "head.onnx").unlink()
    for fmt, name in (("onnx", "head.onnx"), ("torchscript", "head.pt"), ("executorch", "head.pte")):
        done = _isplit("export-head", str(folder), "--format", fmt)
        if fmt == "executorch" and "needs the `executorch` package" in done.stderr:
            assert done.returncode == 2
            continue
        assert done.returncode == 0, done.stderr
        entry = json.loads((folder / "head.json").read_text())["artifacts"][fmt]
        assert entry["file"] == name and entry["sha256"] == sha256_file(folder / name)
    onnx_client = EdgeClient(folder / "head.onnx", "http://127.0.0.1:9/unused", runtime="onnxruntime")
    torch_client = EdgeClient(folder / "head.pt", "http://127.0.0.1:9/unused")
    x = torch_client.preprocess(images)
    with torch.inference_mode():
        torch.testing.assert_close(onnx_client.head(x), torch_client.head(x), atol=1e-4, rtol=0)


def test_export_head_on_a_folder_without_a_head_exits_2(tmp_path: Path) -> None:
    done = _isplit("export-head", str(tmp_path), "--format", "onnx")
    assert done.returncode == 2 and "holds no head.json" in done.stderr


def test_edge_predict_cli_runs_the_onnx_head_with_the_timing_breakdown(candidate: Path, images: list[Path]) -> None:
    """The command line with ``--runtime onnxruntime``, against a tail that decodes the payload
    and answers with the code's shape (so the ONNX code really travelled)."""
    import http.server
    import threading

    from isplit import wire

    shapes: list[list[int]] = []

    class Tail(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            code = wire.decode(self.rfile.read(int(self.headers["Content-Length"])))
            shapes.append(list(code.shape))
            preds = [[{"class": 0, "name": "0", "probability": 1.0}] for _ in range(code.shape[0])]
            body = json.dumps({"predictions": preds}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tail)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predictions/t"
        done = _isplit("edge", "predict", "--runtime", "onnxruntime", "--head", str(candidate / "head.onnx"),
                       "--endpoint", url, *map(str, images[:3]))  # fmt: skip
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert "head run with onnxruntime" in done.stdout and "| encode" in done.stdout and "network+tail" in done.stdout
    meta = json.loads((candidate / "head.json").read_text())
    assert shapes == [[3, *meta["code_shape"]]]
