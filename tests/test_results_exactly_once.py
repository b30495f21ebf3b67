"""Results exactly once in the API view, end to end: the real analyzer and trainer on a broker
of the test's own, stopped while the trainer publishes its result and started again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from isplit.bus import Topics
from isplit.messages import TrainingResult
from tests.fixtures.kafka import private_kafka
from tests.fixtures.services import ServiceProcess, free_port
from tests.kafka_util import collect, send
from tests.test_analyzer import Analyzer
from tests.test_analyzer_replicas import metric

pytestmark = pytest.mark.kafka


def wait_for(what: str, ready: Callable[[], object], timeout_s: float, *logs: ServiceProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s:\n" + "\n".join(p.log() for p in logs)
        time.sleep(0.5)


def test_a_broker_outage_during_the_trainers_publish_leaves_one_result_in_the_view(tmp_path: Path, digits_checkpoint):
    topics = Topics(f"test-{uuid.uuid4().hex[:8]}.")
    root = tmp_path / "artifacts"
    with private_kafka(tmp_path / "kafka") as broker:
        analyzer = Analyzer(root, broker.bootstrap, tmp_path / "analyzer.log", topics=topics).start()
        metrics_port = free_port()
        trainer = ServiceProcess(
            "isplit-trainer",
            {
                "ISPLIT_KAFKA_BOOTSTRAP": broker.bootstrap,
                "ISPLIT_TOPIC_PREFIX": topics.prefix,
                "ISPLIT_ARTIFACT_ROOT": str(root),
                "ISPLIT_TORCHSERVE_MANAGEMENT_URL": "",  # no TorchServe: the result is the point here
                "ISPLIT_TRAINER_GROUP": "test-trainer-" + uuid.uuid4().hex[:8],
                "ISPLIT_TRAINER_DEVICE": "cpu",
                "ISPLIT_TRAINER_METRICS_PORT": str(metrics_port),
                "OMP_NUM_THREADS": "1",
            },
            tmp_path / "trainer.log",
        ).start(health_url=f"http://127.0.0.1:{metrics_port}/metrics")
        try:
            options = {"max_images": 50, "top_k": 1, "epochs": 3, "max_train_images": 1000, "max_test_images": 200}
            job = analyzer.submit(analyzer.upload(digits_checkpoint), options=options)
            view = analyzer.wait(job, timeout_s=300)
            assert view["status"] == "succeeded", view["error"]
            candidate = view["candidates"][0]["candidate_id"]
            result_file = root / "candidates" / candidate / "result.json"

            wait_for("training", lambda: "training candidate" in trainer.log(), 300, trainer)
            broker.stop()
            assert not result_file.exists(), "trained before the broker was down: no publish during the outage"
            wait_for("trained result", result_file.exists, 600, trainer)  # the trainer publishes now
            time.sleep(10)  # the publish meets the outage
            broker.start()

            def measured() -> dict | None:
                return analyzer.get(f"/v1/analyses/{job}").json()["candidates"][0]["measured"]

            wait_for("measured result", measured, 300, trainer, analyzer.proc)
            on_topic = collect(
                broker.bootstrap, topics.results, TrainingResult, lambda r: r.candidate_id == candidate, linger_s=5
            )
            send(broker.bootstrap, topics.results, job, on_topic[0])  # and once more, for certain
            seen = len(on_topic) + 1

            def counted() -> tuple[float, float]:
                return tuple(metric(analyzer, f"isplit_analyzer_results_{n}_total") for n in ("consumed", "duplicate"))

            # At least once: a consumer renewed after the outage (its fetching stuck) or whose group
            # membership the outage ended reads again what it had not committed, so a record may be
            # counted twice as a duplicate; attached (consumed) it is exactly once.
            wait_for("duplicates ignored", lambda: counted()[1] >= seen - 1, 120, analyzer.proc)
            assert counted()[0] == 1.0
            view = analyzer.get(f"/v1/analyses/{job}").json()
            assert [c["measured"] for c in view["candidates"]] == [on_topic[0].model_dump(mode="json")]
            assert view["correlation"]["measured"] == 1
        finally:
            trainer.terminate()
            analyzer.proc.terminate()
