"""The trainer's Kubernetes executor: one ``batch/v1`` Job per split candidate.

With ``ISPLIT_TRAINER_EXECUTOR=kubernetes`` the trainer pod stays a light Kafka consumer and
each candidate trains in its own Job (on a GPU node when asked): :func:`build_job` turns a
candidate into a Job manifest, :class:`KubernetesExecutor` creates it, watches it until it
succeeds, fails or times out, and reports a :class:`JobOutcome` (the Job machinery is shared
with the analyzer: ``isplit.k8s``). The Job runs the trainer image with the candidate in
``ISPLIT_CANDIDATE_JSON`` and writes its artifacts to the shared artifact volume, where the
trainer picks them up to register and publish.

The Helm chart renders everything cluster-specific (image, namespace, GPUs, node selector,
tolerations, claim, ServiceAccount, resources) into ``ISPLIT_TRAINER_JOB_TEMPLATE``, a JSON
:class:`JobTemplate`. The Job name is derived from the candidate id, so the same candidate
submitted twice finds its existing Job instead of training again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from isplit import k8s
from isplit.k8s import JobOutcome, KubernetesJobs, job_outcome, label_value

__all__ = ["JobOutcome", "JobTemplate", "KubernetesExecutor", "build_job", "job_name", "job_outcome", "label_value"]

JOB_TEMPLATE_ENV = "ISPLIT_TRAINER_JOB_TEMPLATE"
CANDIDATE_JSON_ENV = "ISPLIT_CANDIDATE_JSON"
CANDIDATE_ID_LABEL = "isplit.io/candidate-id"
ANALYSIS_ID_LABEL = "isplit.io/analysis-id"
_NAME_PREFIX = "isplit-train-"


def job_name(candidate_id: str) -> str:
    """The candidate's Job: ``isplit-train-<slug>-<hash>``, a DNS-1123 label of at most 63 chars."""
    if not candidate_id:
        raise ValueError("candidate_id must be a non-empty string")
    return k8s.job_name(_NAME_PREFIX, candidate_id)


def _candidate_job_fields(candidate_id: str, analysis_id: str, candidate_json: str) -> tuple[dict, dict[str, str]]:
    """The Job's name, labels and container (``isplit.k8s.build_job`` keywords) and its env."""
    fields = {
        "name": job_name(candidate_id),
        "component": "training-job",
        "managed_by": "isplit-trainer",
        "ids": {CANDIDATE_ID_LABEL: candidate_id, ANALYSIS_ID_LABEL: analysis_id},
        "container_name": "trainer",
    }
    env = {"ISPLIT_CANDIDATE_ID": candidate_id, "ISPLIT_ANALYSIS_ID": analysis_id, CANDIDATE_JSON_ENV: candidate_json}
    return fields, env


def build_job(*, candidate_id: str, analysis_id: str, candidate_json: str, env: dict[str, str], **kwargs: Any) -> dict:
    """The ``batch/v1`` Job manifest that trains one candidate (``isplit.k8s.build_job``): the
    container gets ``env`` plus ``ISPLIT_CANDIDATE_JSON`` (the candidate message),
    ``ISPLIT_CANDIDATE_ID`` and ``ISPLIT_ANALYSIS_ID``; the other keywords are
    ``isplit.k8s.build_job``'s."""
    fields, ids_env = _candidate_job_fields(candidate_id, analysis_id, candidate_json)
    return k8s.build_job(**fields, env={**env, **ids_env}, **kwargs)


class JobTemplate(k8s.JobTemplate):
    """The chart's ``ISPLIT_TRAINER_JOB_TEMPLATE`` (see ``isplit.k8s.JobTemplate``)."""

    def build(self, *, candidate_id: str, analysis_id: str, candidate_json: str) -> dict:
        """The Job for one candidate (see :func:`build_job`); its deadline is the timeout."""
        fields, ids_env = _candidate_job_fields(candidate_id, analysis_id, candidate_json)
        return self.job(env=ids_env, **fields)


class KubernetesExecutor:
    """Runs candidates as Jobs (``isplit.k8s.KubernetesJobs``; the permissions it needs are there)."""

    def __init__(self, template: JobTemplate, **kwargs: Any) -> None:
        self.template = template
        self.jobs = KubernetesJobs(**kwargs)

    @classmethod
    def from_template_json(cls, text: str, **kwargs: Any) -> KubernetesExecutor:
        return cls(JobTemplate.from_json(text), **kwargs)

    def run(
        self,
        *,
        candidate_id: str,
        analysis_id: str,
        candidate_json: str,
        should_stop: Callable[[], bool] | None = None,
    ) -> JobOutcome:
        """Create the candidate's Job (or adopt the existing one of the same candidate), wait
        until it finishes or ``template.timeout_seconds`` pass, and return the outcome. A Job
        that times out is deleted with its pods. When ``should_stop()`` turns true (SIGTERM)
        the wait is abandoned (``isplit.retrain.Abandoned``) and the Job left running: the
        trainer that gets the candidate next adopts it, so its result is published once."""
        manifest = self.template.build(
            candidate_id=candidate_id, analysis_id=analysis_id, candidate_json=candidate_json
        )
        return self.jobs.run(manifest, timeout_seconds=self.template.timeout_seconds, should_stop=should_stop)
