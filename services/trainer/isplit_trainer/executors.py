"""Where a candidate is trained: in this process (``inline``) or as a Kubernetes Job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from isplit.messages import SplitCandidate, TrainingResult
from isplit_trainer.config import Settings
from isplit_trainer.pipeline import existing_result, register_result, train_candidate


class Executor(Protocol):
    def run(self, candidate: SplitCandidate, should_stop: Callable[[], bool]) -> TrainingResult: ...


class InlineExecutor:
    """Trains in the trainer process (CUDA when present)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self, candidate: SplitCandidate, should_stop: Callable[[], bool]) -> TrainingResult:
        return train_candidate(candidate, self.settings, should_stop)


class KubernetesJobExecutor:
    """One ``batch/v1`` Job per candidate (``isplit-trainer train-candidate`` on the same image);
    the Job trains, exports and writes ``result.json`` to the shared artifact volume; this
    process registers the tail with TorchServe (Jobs reach nothing else) and publishes."""

    def __init__(self, settings: Settings) -> None:
        from isplit_trainer.k8s_executor import KubernetesExecutor

        if not settings.trainer_job_template:
            raise ValueError("ISPLIT_TRAINER_JOB_TEMPLATE is required with the kubernetes executor")
        self.settings = settings
        self.executor = KubernetesExecutor.from_template_json(settings.trainer_job_template)

    def run(self, candidate: SplitCandidate, should_stop: Callable[[], bool]) -> TrainingResult:
        outcome = self.executor.run(
            candidate_id=candidate.candidate_id,
            analysis_id=candidate.analysis_id,
            candidate_json=candidate.model_dump_json(),
            should_stop=should_stop,
        )
        result = existing_result(self.settings, candidate.candidate_id)
        if result is not None:
            return register_result(result, self.settings)
        reason = f"training Job {outcome.job_name} {outcome.status}: {outcome.reason} {outcome.message}".strip()
        return TrainingResult.failure(candidate, reason, self.settings.trainer_id)


def make_executor(settings: Settings) -> Executor:
    if settings.trainer_executor == "kubernetes":
        return KubernetesJobExecutor(settings)
    return InlineExecutor(settings)
