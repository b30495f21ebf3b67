"""Kubernetes batch/v1 Jobs for isplit's services: build the manifest, run it, watch it.

The trainer runs one Job per split candidate (``isplit_trainer.k8s_executor``); the analyzer
one Indexed Job per sharded analysis (``isplit_analyzer.executors``). Both build their Jobs with
:func:`build_job` from a :class:`JobTemplate` (everything cluster-specific: image, namespace,
GPUs, node selector, tolerations, claim, ServiceAccount, resources), which the Helm chart renders
as JSON into the service's environment, and both run them with :class:`KubernetesJobs`: create
(or adopt the existing Job of the same name), watch until it succeeds, fails or times out,
report a :class:`JobOutcome`. The ``kubernetes`` client is imported only when a Job is run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ARTIFACT_ROOT = "/var/lib/isplit/artifacts"
GPU_RESOURCE = "nvidia.com/gpu"
# The uid/gid of the images' non-root user; the artifact volume's group (fsGroup).
RUN_AS_USER = 10001
RUN_AS_GROUP = 10001

# How often a waiting service checks whether it was asked to stop, seconds.
STOP_POLL_SECONDS = 3

MAX_NAME = 63  # a Job's name becomes a pod label value (job-name), so 63, not 253
_HASH_LEN = 10
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def job_name(prefix: str, key: str, *, max_len: int = MAX_NAME) -> str:
    """A DNS-1123 label ``<prefix><slug>-<hash>`` of at most ``max_len`` chars naming the Job of ``key``.

    The slug is the lower-cased key with every run of other characters turned into ``-``; the
    hash (first 10 hex digits of SHA-256 of the exact key) keeps keys that slug alike apart,
    e.g. ``"A_1"`` and ``"a-1"``. The same key always gets the same name.
    """
    if not key:
        raise ValueError("the Job's key (candidate_id, analysis id) must be a non-empty string")
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:_HASH_LEN]
    room = max_len - len(prefix) - 1 - _HASH_LEN
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")[:room].strip("-")
    return f"{prefix}{slug}-{digest}" if slug else f"{prefix}{digest}"


def label_value(value: str) -> str:
    """``value`` when it is a valid label value (<= 63 chars), else a valid shortened form
    ending in a hash of the full value (the full value goes in an annotation)."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:_HASH_LEN]
    head = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[: 63 - _HASH_LEN - 1]
    head = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", head)
    return f"{head}-{digest}" if head else digest


def build_job(
    *,
    name: str,
    component: str,
    managed_by: str,
    ids: Mapping[str, str],
    image: str,
    namespace: str,
    command: list[str],
    env: Mapping[str, str],
    gpu_count: int,
    node_selector: Mapping[str, str],
    tolerations: list[dict],
    artifact_claim: str,
    service_account: str,
    resources: dict,
    ttl_seconds_after_finished: int = 3600,
    backoff_limit: int = 1,
    labels: Mapping[str, str] | None = None,
    active_deadline_seconds: int | None = None,
    indexed_completions: int | None = None,
    fail_on_exit_codes: list[int] | None = None,
    container_name: str = "worker",
) -> dict:
    """A ``batch/v1`` Job manifest named ``name``.

    The container runs ``command`` on ``image`` with ``env``; the artifact claim is mounted at
    ``env["ISPLIT_ARTIFACT_ROOT"]`` (default ``/var/lib/isplit/artifacts``). ``ids`` (e.g.
    ``isplit.io/analysis-id``) become labels (shortened where needed) and annotations (exact).
    ``resources`` are Kubernetes requests/limits; ``gpu_count > 0`` adds ``nvidia.com/gpu`` to
    the limits. ``labels`` (e.g. the chart's selector labels) are added to the Job and its pod,
    with ``app.kubernetes.io/component: component`` and ``managed-by: managed_by``.
    ``indexed_completions=N`` makes an Indexed Job of N pods at once (``completionMode:
    Indexed``, ``completions = parallelism = N``); each pod reads its index from
    ``JOB_COMPLETION_INDEX``. A pod exiting with one of ``fail_on_exit_codes`` (an error the
    input causes, which a retry would repeat) fails the Job at once instead of being retried
    (``podFailurePolicy``). The pod meets Pod Security "restricted": non-root,
    RuntimeDefault seccomp, no capabilities, read-only root filesystem with writable ``/tmp``
    and ``/dev/shm``, no API token.
    """
    if gpu_count < 0:
        raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
    if not command:
        raise ValueError("command must name the program the Job runs")
    if not artifact_claim:
        raise ValueError("artifact_claim must name the artifact PersistentVolumeClaim")
    if indexed_completions is not None and indexed_completions < 1:
        raise ValueError(f"indexed_completions must be >= 1, got {indexed_completions}")
    artifact_root = env.get("ISPLIT_ARTIFACT_ROOT", DEFAULT_ARTIFACT_ROOT)

    pod_labels = {
        "app.kubernetes.io/name": "isplit",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "isplit",
        **dict(labels or {}),
        "app.kubernetes.io/managed-by": managed_by,
        **{key: label_value(value) for key, value in ids.items()},
    }
    annotations = dict(ids)

    container_resources = copy.deepcopy(resources) if resources else {}
    if gpu_count > 0:
        container_resources.setdefault("limits", {})[GPU_RESOURCE] = str(gpu_count)

    container_env = [{"name": key, "value": str(value)} for key, value in sorted(env.items())]
    container_env += [
        {"name": "ISPLIT_ARTIFACT_ROOT", "value": artifact_root},
        # Caches somewhere writable: the root filesystem is read-only.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    # Later entries win: drop earlier duplicates of names the Job sets itself.
    seen: set[str] = set()
    deduped = []
    for item in reversed(container_env):
        if item["name"] not in seen:
            seen.add(item["name"])
            deduped.append(item)
    container_env = list(reversed(deduped))

    container = {
        "name": container_name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(command),
        "env": container_env,
        "resources": container_resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_GROUP,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "artifacts", "mountPath": artifact_root},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_GROUP,
            "fsGroup": RUN_AS_GROUP,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "artifacts", "persistentVolumeClaim": {"claimName": artifact_claim}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = copy.deepcopy(list(tolerations))

    spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "ttlSecondsAfterFinished": ttl_seconds_after_finished,
        "template": {"metadata": {"labels": dict(pod_labels), "annotations": dict(annotations)}, "spec": pod_spec},
    }
    if indexed_completions is not None:
        spec["completionMode"] = "Indexed"
        spec["completions"] = indexed_completions
        spec["parallelism"] = indexed_completions
    if fail_on_exit_codes:
        spec["podFailurePolicy"] = {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": container_name, "operator": "In", "values": fail_on_exit_codes},
                }
            ]
        }
    if active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": pod_labels, "annotations": annotations},
        "spec": spec,
    }


class JobTemplate(BaseModel):
    """Everything cluster-specific about a service's Jobs; the chart renders it as JSON into the
    service's environment. Field names are :func:`build_job`'s keywords; ``timeout_seconds``
    becomes the Job's ``activeDeadlineSeconds`` and how long the service waits."""

    model_config = ConfigDict(extra="forbid")

    image: str
    namespace: str
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    gpu_count: int = Field(default=0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict] = Field(default_factory=list)
    artifact_claim: str
    service_account: str
    resources: dict = Field(default_factory=dict)
    ttl_seconds_after_finished: int = Field(default=3600, ge=0)
    backoff_limit: int = Field(default=1, ge=0)
    labels: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: int = Field(default=7200, gt=0, description="seconds to wait for a Job")

    @classmethod
    def from_json(cls, text: str) -> JobTemplate:
        """Parse the JSON the chart renders (raises ``pydantic.ValidationError`` naming the bad field)."""
        return cls.model_validate(json.loads(text))

    def job(self, *, name: str, component: str, managed_by: str, ids: Mapping[str, str],
            env: Mapping[str, str], **kwargs: Any) -> dict:  # fmt: skip
        """:func:`build_job` with this template, ``env`` added to the template's (and winning)."""
        fields = self.model_dump(exclude={"timeout_seconds", "env"})
        return build_job(
            name=name,
            component=component,
            managed_by=managed_by,
            ids=ids,
            env={**self.env, **env},
            active_deadline_seconds=self.timeout_seconds,
            **fields,
            **kwargs,
        )


@dataclass(frozen=True)
class JobOutcome:
    """How a Job ended. ``status``: succeeded, failed or timed_out; ``reason`` and
    ``message`` from the Job's condition (or the timeout); ``log_tail`` the last lines of the
    failed pod's log ("" when unavailable)."""

    job_name: str
    status: Literal["succeeded", "failed", "timed_out"]
    reason: str = ""
    message: str = ""
    log_tail: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


def job_outcome(job: Mapping[str, Any]) -> JobOutcome | None:
    """The outcome of a Job from its status (a manifest dict), or None while it still runs.

    A Job has finished when its ``Complete`` or ``Failed`` condition is ``True`` (Kubernetes
    1.31+ also sets ``SuccessCriteriaMet``/``FailureTarget`` first; those count as well).
    """
    name = job.get("metadata", {}).get("name", "")
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if str(condition.get("status")) != "True":
            continue
        kind = condition.get("type")
        reason = condition.get("reason") or ""
        message = condition.get("message") or ""
        if kind in ("Complete", "SuccessCriteriaMet"):
            return JobOutcome(name, "succeeded", reason, message)
        if kind in ("Failed", "FailureTarget"):
            return JobOutcome(name, "failed", reason, message)
    return None


class KubernetesJobs:
    """Runs Jobs through the Kubernetes API (in-cluster config, else kubeconfig).

    Needs, in the Job namespace: ``jobs`` create/get/list/watch/delete, ``pods`` list and
    ``pods/log`` get (the chart's Roles grant exactly that).
    """

    def __init__(
        self,
        *,
        batch_api: Any = None,
        core_api: Any = None,
        clock: Callable[[], float] = time.monotonic,
        log_lines: int = 40,
    ) -> None:
        self._batch = batch_api
        self._core = core_api
        self._clock = clock
        self._log_lines = log_lines

    def _apis(self) -> tuple[Any, Any]:
        if self._batch is None or self._core is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._batch = self._batch or client.BatchV1Api()
            self._core = self._core or client.CoreV1Api()
        return self._batch, self._core

    def run(
        self,
        manifest: dict,
        *,
        timeout_seconds: float,
        should_stop: Callable[[], bool] | None = None,
    ) -> JobOutcome:
        """Create the Job ``manifest`` (or adopt the existing Job of that name), wait until it
        finishes or ``timeout_seconds`` pass, and return the outcome (a failed one with its
        newest pod's log tail). A Job that times out is deleted with its pods. When
        ``should_stop()`` turns true the wait is abandoned (``isplit.retrain.Abandoned``) and
        the Job left running, for the next attempt to adopt."""
        self.create(manifest)
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        outcome = self.wait(name, namespace, timeout_seconds=timeout_seconds, should_stop=should_stop)
        if outcome.status == "failed":
            outcome = JobOutcome(
                outcome.job_name, outcome.status, outcome.reason, outcome.message, self.log_tail(name, namespace)
            )
        return outcome

    def create(self, manifest: dict) -> None:
        """Create the Job; one of that name existing already is adopted (not an error)."""
        from kubernetes.client.exceptions import ApiException

        batch, _ = self._apis()
        try:
            batch.create_namespaced_job(namespace=manifest["metadata"]["namespace"], body=manifest)
        except ApiException as exc:
            if exc.status != 409:  # 409: the Job exists already; wait for it
                raise

    def wait(
        self,
        name: str,
        namespace: str,
        *,
        timeout_seconds: float,
        should_stop: Callable[[], bool] | None = None,
    ) -> JobOutcome:
        """Watch Job ``name`` until it finishes; after ``timeout_seconds`` delete it and report
        ``timed_out``. ``should_stop`` is polled at least every ``STOP_POLL_SECONDS``."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        from isplit.retrain import Abandoned

        batch, _ = self._apis()
        deadline = self._clock() + timeout_seconds
        watch_cap = STOP_POLL_SECONDS if should_stop is not None else 300
        while True:
            if should_stop is not None and should_stop():
                raise Abandoned(f"stopped while waiting for Job {name}")
            current = batch.read_namespaced_job(name=name, namespace=namespace)
            outcome = job_outcome(_as_dict(batch, current))
            if outcome is not None:
                return outcome
            remaining = deadline - self._clock()
            if remaining <= 0:
                self.delete(name, namespace)
                return JobOutcome(name, "timed_out", "Timeout", f"no result after {timeout_seconds:.0f} s")
            stream = watch.Watch().stream(
                batch.list_namespaced_job,
                namespace=namespace,
                field_selector=f"metadata.name={name}",
                resource_version=current.metadata.resource_version,
                timeout_seconds=max(1, min(int(remaining), watch_cap)),
            )
            try:
                for event in stream:
                    if event["type"] == "DELETED":
                        return JobOutcome(name, "failed", "Deleted", "the Job was deleted before it finished")
                    outcome = job_outcome(_as_dict(batch, event["object"]))
                    if outcome is not None:
                        return outcome
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: the resource version expired; read again
                    raise

    def delete(self, name: str, namespace: str) -> None:
        """Delete Job ``name`` and its pods (gone already: fine)."""
        from kubernetes.client.exceptions import ApiException

        batch, _ = self._apis()
        try:
            batch.delete_namespaced_job(name=name, namespace=namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def log_tail(self, name: str, namespace: str) -> str:
        """The last lines of the newest pod of the Job, "" when they cannot be read."""
        from kubernetes.client.exceptions import ApiException

        _, core = self._apis()
        try:
            pods = core.list_namespaced_pod(namespace=namespace, label_selector=f"job-name={name}").items
            if not pods:
                return ""
            newest = max(pods, key=lambda pod: pod.metadata.creation_timestamp)
            return core.read_namespaced_pod_log(
                name=newest.metadata.name, namespace=namespace, tail_lines=self._log_lines
            )
        except ApiException:
            return ""


def _as_dict(api: Any, obj: Any) -> dict:
    """A client model object as a manifest-shaped dict (camelCase keys)."""
    if isinstance(obj, dict):
        return obj
    return api.api_client.sanitize_for_serialization(obj)
