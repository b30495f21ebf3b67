"""``isplit-trainer``: the consumer service (default) or one candidate (``train-candidate``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from isplit.messages import MessageError, SplitCandidate, decode
from isplit_trainer.config import Settings, get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isplit-trainer", description="isplit trainer service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "train-candidate"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if args.command == "train-candidate":
        return train_one(settings)
    from isplit_trainer.consumer import TrainerLoop
    from isplit_trainer.probes import serve_probes

    loop = TrainerLoop(settings)
    serve_probes(settings.trainer_metrics_port, loop.progress)
    signal.signal(signal.SIGTERM, loop.request_stop)
    signal.signal(signal.SIGINT, loop.request_stop)
    loop.run()
    return 0


def train_one(settings: Settings) -> int:
    """Inside a Kubernetes Job: train the candidate in ISPLIT_CANDIDATE_JSON, write result.json."""
    from isplit_trainer.pipeline import CandidateError, train_candidate

    try:
        candidate = decode(SplitCandidate, os.environ.get("ISPLIT_CANDIDATE_JSON", ""))
        result = train_candidate(candidate, settings, register=False)
    except (MessageError, CandidateError) as exc:
        print(f"isplit-trainer: error: {exc}", file=sys.stderr)
        return 2
    print(result.model_dump_json())
    return 0 if result.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
