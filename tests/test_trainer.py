"""The trainer service against a real Kafka broker and a real TorchServe."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import requests
import torch

from isplit import torchserve as ts
from isplit import wire
from isplit.bus import Topics
from isplit.messages import (
    BottleneckSpec,
    DatasetSpec,
    DeadLetter,
    ModelSpec,
    SplitCandidate,
    TrainingResult,
    candidate_id_for,
)
from tests.fixtures.services import ServiceProcess, free_port
from tests.kafka_util import collect, send, send_raw

pytestmark = [pytest.mark.kafka, pytest.mark.torchserve]


def make_candidate(cut: str = "features.15", epochs: int = 1, train_images: int = 300) -> SplitCandidate:
    aid = "t" + uuid.uuid4().hex[:10]
    return SplitCandidate(
        analysis_id=aid,
        candidate_id=candidate_id_for(aid, cut),
        model=ModelSpec(
            arch="vgg11", num_classes=10, in_channels=1, input_size=32, weights_uri="models/m-000000000001.pt"
        ),
        dataset=DatasetSpec(name="digits", max_train_images=train_images, max_test_images=120),
        cut=cut,
        predicted_rank=1,
        cui=0.1,
        log10_cui=-1.0,
        size_rank=1,
        output_shape=[32, 2, 2],
        output_bytes=512,
        target="label",
        bottleneck=BottleneckSpec(epochs=epochs, lr=5e-3),
    )


@pytest.fixture
def topics() -> Topics:
    """Topics of this test alone: no other test's trainer or analyzer sees its messages."""
    return Topics(f"test-{uuid.uuid4().hex[:8]}.")


@pytest.fixture
def trainer_env(kafka_bootstrap: str, torchserve, artifact_root: Path, topics: Topics) -> dict[str, str]:
    return {
        "ISPLIT_TOPIC_PREFIX": topics.prefix,
        "ISPLIT_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "ISPLIT_ARTIFACT_ROOT": str(artifact_root),
        "ISPLIT_TORCHSERVE_MANAGEMENT_URL": torchserve.management_url,
        "ISPLIT_TORCHSERVE_INFERENCE_URL": torchserve.inference_url,
        "ISPLIT_TORCHSERVE_MODEL_STORE": str(torchserve.model_store),
        "ISPLIT_TORCHSERVE_KEY_FILE": str(torchserve.key_file),
        "ISPLIT_TRAINER_GROUP": "test-trainer",
        "ISPLIT_TRAINER_DEVICE": "cpu",
    }


def start_trainer(env: dict[str, str], tmp_path: Path, name: str = "trainer") -> tuple[ServiceProcess, int]:
    port = free_port()
    proc = ServiceProcess("isplit-trainer", {**env, "ISPLIT_TRAINER_METRICS_PORT": str(port)}, tmp_path / f"{name}.log")
    proc.start(health_url=f"http://127.0.0.1:{port}/metrics")
    return proc, port


def results_for(bootstrap: str, topics: Topics, cid: str, **kw) -> list[TrainingResult]:
    return collect(bootstrap, topics.results, TrainingResult, lambda r: r.candidate_id == cid, **kw)


def metric(port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_candidate_becomes_a_registered_tail_that_answers(
    topics, kafka_bootstrap, trainer_env, torchserve, artifact_root, tmp_path
):
    trainer, _port = start_trainer(trainer_env, tmp_path)
    try:
        cand = make_candidate()
        send(kafka_bootstrap, topics.candidates, cand.analysis_id, cand)
        [result] = results_for(kafka_bootstrap, topics, cand.candidate_id, timeout_s=240)
    finally:
        assert trainer.terminate() == 0, trainer.log()
    assert result.status == "succeeded", result.error
    assert result.model_name == f"isplit-{cand.candidate_id}"
    assert 0.0 <= result.accuracy_split <= 1.0 and result.accuracy_original > 0.5
    assert result.bytes_per_image["fp16"] * 2 == result.bytes_per_image["fp32"]
    assert result.head_flops > 0 and result.tail_flops > 0 and result.latency_ms > 0
    # The edge side: run the exported head, send its code to the registered tail.
    head_dir = artifact_root / Path(result.head_uri).parent
    head = torch.jit.load(str(artifact_root / result.head_uri))
    meta = json.loads((head_dir / "head.json").read_text())
    assert meta["candidate_id"] == cand.candidate_id and meta["input_size"] == 32
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        local = torch.jit.load(str(head_dir / "tail.pt"))(head(x)).argmax(1).tolist()
        answer = ts.predict(
            torchserve.inference_url, result.model_name, wire.encode(head(x), "fp32"), key=torchserve.keys().inference
        )
    served = [preds[0]["class"] for preds in answer["predictions"]]
    assert served == local


def test_redelivered_candidate_is_republished_not_retrained(topics, kafka_bootstrap, trainer_env, tmp_path):
    trainer, port = start_trainer(trainer_env, tmp_path)
    try:
        cand = make_candidate()
        send(kafka_bootstrap, topics.candidates, cand.analysis_id, cand)
        results_for(kafka_bootstrap, topics, cand.candidate_id, timeout_s=240)
        send(kafka_bootstrap, topics.candidates, cand.analysis_id, cand)
        results = results_for(kafka_bootstrap, topics, cand.candidate_id, count=2, timeout_s=60)
        assert metric(port, 'isplit_trainer_candidates_total{outcome="republished"}') == 1
    finally:
        trainer.terminate()
    assert len(results) == 2 and results[0].accuracy_split == results[1].accuracy_split


def test_killed_trainer_redelivers_and_exactly_one_result_appears(topics, kafka_bootstrap, trainer_env, tmp_path):
    cand = make_candidate(epochs=40, train_images=200)
    first, port = start_trainer(trainer_env, tmp_path, "first")
    send(kafka_bootstrap, topics.candidates, cand.analysis_id, cand)
    deadline = time.monotonic() + 120
    while metric(port, "isplit_trainer_epoch") < 2:  # training is under way
        assert time.monotonic() < deadline, first.log()
        time.sleep(0.3)
    first.kill()
    second, _ = start_trainer(trainer_env, tmp_path, "second")
    try:
        results = results_for(kafka_bootstrap, topics, cand.candidate_id, timeout_s=300, linger_s=5)
    finally:
        second.terminate()
    assert [r.status for r in results] == ["succeeded"]


def test_sigterm_abandons_the_candidate_and_exits_zero(topics, kafka_bootstrap, trainer_env, tmp_path):
    cand = make_candidate(epochs=200, train_images=200)
    trainer, port = start_trainer(trainer_env, tmp_path)
    send(kafka_bootstrap, topics.candidates, cand.analysis_id, cand)
    deadline = time.monotonic() + 120
    while metric(port, "isplit_trainer_epoch") < 1:
        assert time.monotonic() < deadline, trainer.log()
        time.sleep(0.3)
    started = time.monotonic()
    assert trainer.terminate(timeout_s=60) == 0
    assert time.monotonic() - started < 30
    assert "trainer stopped" in trainer.log()
    assert not results_for(kafka_bootstrap, topics, cand.candidate_id, timeout_s=3)


def test_bad_messages_are_dead_lettered_and_the_loop_goes_on(topics, kafka_bootstrap, trainer_env, tmp_path):
    trainer, port = start_trainer(trainer_env, tmp_path)
    marker = uuid.uuid4().hex
    bad_cut = make_candidate(cut="features.99")
    missing = make_candidate().model_copy(
        update={"model": make_candidate().model.model_copy(update={"weights_uri": "models/nope.pt"})}
    )
    try:
        send_raw(kafka_bootstrap, b"not json " + marker.encode(), key=marker, topic=topics.candidates)
        send_raw(
            kafka_bootstrap,
            json.dumps({"schema_version": 99, "marker": marker}).encode(),
            key=marker,
            topic=topics.candidates,
        )
        send(kafka_bootstrap, topics.candidates, bad_cut.analysis_id, bad_cut)
        send(kafka_bootstrap, topics.candidates, missing.analysis_id, missing)
        keys = {marker, bad_cut.analysis_id, missing.analysis_id}
        letters = collect(
            kafka_bootstrap, topics.dead_letter, DeadLetter, lambda d: d.key in keys, count=4, timeout_s=120
        )
        assert trainer.proc.poll() is None
    finally:
        trainer.terminate()
    reasons = sorted(d.reason for d in letters)
    assert any("not valid JSON" in r for r in reasons), reasons
    assert any("schema_version 99" in r for r in reasons), reasons
    assert any("features.99" in r for r in reasons), reasons
    assert any("models/nope.pt" in r for r in reasons), reasons
    assert any(d.original().startswith(b"not json") for d in letters)
