"""Messages are untrusted input: poison records on both topics, against the real broker and the
real services. A poison record is dead-lettered with the reason, the valid record behind it on
the same partition is processed, and ``/readyz`` says whether each consumer keeps up."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from kafka import KafkaAdminClient
from kafka.errors import UnknownTopicOrPartitionError

from isplit.bus import Topics, ensure_topics
from isplit.messages import DatasetSpec, DeadLetter, TrainingResult
from tests.fixtures.services import ServiceProcess, free_port
from tests.kafka_util import collect, send, send_raw
from tests.test_analyzer import Analyzer
from tests.test_trainer import make_candidate

pytestmark = pytest.mark.kafka

# The probe's payload: json.loads raised RecursionError on it, out of both consumer loops.
POISON = b"[" * 100000 + b"]" * 100000


def wait_for(check: Callable[[], bool], what: str, timeout_s: float, log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s:\n{log()}"
        time.sleep(0.5)


def readyz(url: str) -> int:
    try:
        return requests.get(url + "/readyz", timeout=10).status_code
    except requests.RequestException:
        return 0


def delete_topic(bootstrap: str, topic: str, timeout_s: float = 30) -> None:
    """Delete ``topic``, retrying while the broker does not host it yet (the trainer created it
    a moment ago: a KRaft broker can answer UnknownTopicOrPartition until the creation lands)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-delete")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                admin.delete_topics([topic])
                break
            except UnknownTopicOrPartitionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        admin.close()
    time.sleep(1)


def letters_for(bootstrap: str, topics: Topics, key: str, count: int = 1) -> list[DeadLetter]:
    return collect(bootstrap, topics.dead_letter, DeadLetter, lambda d: d.key == key, count=count, timeout_s=120)


# -- the trainer ------------------------------------------------------------------------------


@pytest.fixture
def bare_trainer(kafka_bootstrap: str, artifact_root: Path, tmp_path: Path):
    """Start a trainer (no TorchServe: tails are not registered) with extra settings."""
    started: list[ServiceProcess] = []

    def start(topics: Topics, **extra: str) -> tuple[ServiceProcess, str]:
        port = free_port()
        env = {
            "ISPLIT_TOPIC_PREFIX": topics.prefix,
            "ISPLIT_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "ISPLIT_ARTIFACT_ROOT": str(artifact_root),
            "ISPLIT_TORCHSERVE_MANAGEMENT_URL": "",
            "ISPLIT_TRAINER_GROUP": "test-trainer",
            "ISPLIT_TRAINER_DEVICE": "cpu",
            "ISPLIT_TRAINER_METRICS_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **extra,
        }
        proc = ServiceProcess("isplit-trainer", env, tmp_path / f"trainer{len(started)}.log")
        started.append(proc)
        proc.start(health_url=f"http://127.0.0.1:{port}/healthz")
        return proc, f"http://127.0.0.1:{port}"

    yield start
    for proc in started:
        proc.terminate()


def test_poison_candidates_are_dead_lettered_and_the_candidate_behind_them_is_trained(kafka_bootstrap, bare_trainer):
    topics = Topics(f"test-{time.monotonic_ns() % 10**8}.")
    valid = make_candidate(epochs=1, train_images=100)
    key = valid.analysis_id  # one key: every record lands on one partition, in this order
    passwd = make_candidate().model_copy(update={"dataset": DatasetSpec(name="imagefolder:/etc")})
    absolute = make_candidate()
    absolute.model.weights_uri = "/etc/passwd"
    trainer, url = bare_trainer(topics)
    send_raw(kafka_bootstrap, POISON, key=key, topic=topics.candidates)
    send(kafka_bootstrap, topics.candidates, key, passwd)
    send(kafka_bootstrap, topics.candidates, key, absolute)
    send(kafka_bootstrap, topics.candidates, key, valid)
    [result] = collect(
        kafka_bootstrap, topics.results, TrainingResult, lambda r: r.status == "succeeded", timeout_s=240
    )
    assert result.candidate_id == valid.candidate_id
    letters = letters_for(kafka_bootstrap, topics, key, count=3)
    reasons = [d.reason for d in letters]
    assert "nested deeper than 32 levels" in reasons[0] and letters[0].original() == POISON
    assert "outside the data root" in reasons[1], reasons
    assert "'/etc/passwd' is outside the artifact root" in reasons[2], reasons
    assert trainer.proc.poll() is None and readyz(url) == 200


def test_trainer_readyz_fails_while_its_consumer_is_stuck_and_recovers(kafka_bootstrap, bare_trainer):
    topics = Topics(f"test-{time.monotonic_ns() % 10**8}.")
    trainer, url = bare_trainer(topics, ISPLIT_CONSUMER_STALL_S="3")
    wait_for(lambda: readyz(url) == 200, "ready", 60, trainer.log)
    # With no dead-letter topic the poison cannot be set aside: the consumer is stuck on it.
    delete_topic(kafka_bootstrap, topics.dead_letter)
    send_raw(kafka_bootstrap, b"not json", key="stuck", topic=topics.candidates)
    wait_for(lambda: readyz(url) == 503, "503 while stuck", 60, trainer.log)
    assert "no progress" in requests.get(url + "/readyz", timeout=10).json()["reason"]
    ensure_topics(kafka_bootstrap, {topics.dead_letter: 1})
    wait_for(lambda: readyz(url) == 200, "ready again", 120, trainer.log)
    assert "not valid JSON" in letters_for(kafka_bootstrap, topics, "stuck")[0].reason


# -- the analyzer ---------------------------------------------------------------------------


def test_poison_result_is_dead_lettered_and_the_result_behind_it_is_attached(
    tmp_path, kafka_bootstrap, digits_checkpoint
):
    analyzer = Analyzer(tmp_path / "artifacts", kafka_bootstrap, tmp_path / "analyzer.log").start()
    try:
        job = analyzer.submit(analyzer.upload(digits_checkpoint), options={"max_images": 60, "top_k": 1})
        [cand] = analyzer.wait(job)["candidates"]
        send_raw(kafka_bootstrap, POISON, key=job, topic=analyzer.topics.results)
        send(
            kafka_bootstrap,
            analyzer.topics.results,
            job,
            TrainingResult(
                analysis_id=job, candidate_id=cand["candidate_id"], cut=cand["cut"], status="succeeded",
                accuracy_split=0.75,
            ),
        )  # fmt: skip

        def attached() -> bool:
            measured = analyzer.get(f"/v1/analyses/{job}").json()["candidates"][0]["measured"]
            return bool(measured) and measured["accuracy_split"] == 0.75

        wait_for(attached, "the result behind the poison attached", 60, analyzer.proc.log)
        [letter] = letters_for(kafka_bootstrap, analyzer.topics, job)
        assert "nested deeper than 32 levels" in letter.reason and letter.original() == POISON
        assert letter.service == "isplit-analyzer"
        assert analyzer.get("/readyz").status_code == 200
    finally:
        analyzer.proc.terminate()


def test_analyzer_readyz_fails_while_the_results_consumer_is_stuck_and_recovers(tmp_path, kafka_bootstrap):
    analyzer = Analyzer(tmp_path / "artifacts", kafka_bootstrap, tmp_path / "analyzer.log", ISPLIT_CONSUMER_STALL_S="3")
    # The analyzer creates its topics when it first publishes candidates; here only the results
    # topic exists: with no dead-letter topic the poison cannot be set aside.
    ensure_topics(kafka_bootstrap, {analyzer.topics.results: 3})
    analyzer.start()
    try:
        wait_for(lambda: readyz(analyzer.url) == 200, "ready", 60, analyzer.proc.log)
        send_raw(kafka_bootstrap, b"not json", key="stuck", topic=analyzer.topics.results)
        wait_for(lambda: readyz(analyzer.url) == 503, "503 while stuck", 60, analyzer.proc.log)
        assert "results consumer stalled" in analyzer.get("/readyz").text
        ensure_topics(kafka_bootstrap, {analyzer.topics.dead_letter: 1})
        wait_for(lambda: readyz(analyzer.url) == 200, "ready again", 120, analyzer.proc.log)
        assert "not valid JSON" in letters_for(kafka_bootstrap, analyzer.topics, "stuck")[0].reason
    finally:
        analyzer.proc.terminate()
