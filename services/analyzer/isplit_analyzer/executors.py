"""Where an analysis is computed: ``inline`` (the analyzer's own child process, the default) or
``kubernetes`` (``ISPLIT_ANALYZER_EXECUTOR=kubernetes``): one ``batch/v1`` Indexed Job per
analysis, ``completions = parallelism = ISPLIT_ANALYZER_SHARDS``.

Each pod of the Job runs ``isplit-analyzer analyze-shard`` on the analyzer image: it reads the
analysis from ``ISPLIT_ANALYSIS_JSON`` and its shard from ``JOB_COMPLETION_INDEX``, and writes
the shard's stats (``isplit.shards``) and its progress to the artifact volume under
``analyses/<id>/shards/``. The analyzer's child process creates the Job (or adopts it after a
restart: the name derives from the analysis id), reports the sum of the shards' progress while
it runs, then merges the stats and continues exactly as inline: report, candidates, Kafka.
A failed pod is retried up to the Job's ``backoffLimit``; a pod that exits 2 (an error the
request causes) fails the Job at once; cancelling the analysis deletes its Job.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isplit import IsplitError
from isplit.analysis import AnalysisResult, result_from_stats
from isplit.k8s import JobTemplate, KubernetesJobs, job_name
from isplit.shards import INDEX_ENV, load_stats, merge, run_shard, save_stats
from isplit_analyzer.config import Settings, get_settings
from isplit_analyzer.jobs import ChildArgs, model_path, report_dir
from isplit_analyzer.schemas import AcceptedAnalysis

log = logging.getLogger("isplit.analyzer.executors")

ANALYSIS_JSON_ENV = "ISPLIT_ANALYSIS_JSON"
ANALYSIS_ID_ENV = "ISPLIT_ANALYSIS_ID"
SHARDS_ENV = "ISPLIT_ANALYSIS_SHARDS"
ANALYSIS_ID_LABEL = "isplit.io/analysis-id"
USER_ERROR_EXIT = 2  # the request cannot be analysed: retrying the pod would not help
# An Indexed Job's pods are named <job>-<index>-<suffix>: keep room for the index.
_MAX_JOB_NAME = 52


def analysis_job_name(analysis_id: str) -> str:
    """The analysis's Job: ``isplit-analyze-<id>-<hash>``, the same for every attempt."""
    return job_name("isplit-analyze-", analysis_id, max_len=_MAX_JOB_NAME)


def shards_dir(artifact_root: Path, analysis_id: str) -> Path:
    return report_dir(artifact_root, analysis_id) / "shards"


def shard_stats_path(artifact_root: Path, analysis_id: str, index: int, count: int) -> Path:
    return shards_dir(artifact_root, analysis_id) / f"shard-{index}-of-{count}.npz"


def shard_progress_path(artifact_root: Path, analysis_id: str, index: int, count: int) -> Path:
    """A text file holding the images shard ``index`` has analysed so far."""
    return shards_dir(artifact_root, analysis_id) / f"shard-{index}-of-{count}.progress"


class AnalysisJobTemplate(JobTemplate):
    """The chart's ``ISPLIT_ANALYZER_JOB_TEMPLATE`` (fields: ``isplit.k8s.JobTemplate``)."""

    def build(self, *, analysis_id: str, request_json: str, shards: int) -> dict:
        """The Indexed Job of one analysis: ``shards`` pods at once, each one shard."""
        return self.job(
            name=analysis_job_name(analysis_id),
            component="analysis-job",
            managed_by="isplit-analyzer",
            ids={ANALYSIS_ID_LABEL: analysis_id},
            env={ANALYSIS_ID_ENV: analysis_id, ANALYSIS_JSON_ENV: request_json, SHARDS_ENV: str(shards)},
            indexed_completions=shards,
            fail_on_exit_codes=[USER_ERROR_EXIT],
            container_name="analyzer",
        )


Progress = Callable[[int], None]


@dataclass(frozen=True)
class IndexedJobAnalysis:
    """Computes an analysis as an Indexed Job (called in the analyzer's child process, so it
    holds only picklable settings)."""

    template_json: str
    shards: int

    def __call__(self, args: ChildArgs, req: AcceptedAnalysis, progress: Progress) -> AnalysisResult:
        template = AnalysisJobTemplate.from_json(self.template_json)
        root = Path(args.artifact_root)
        manifest = template.build(analysis_id=args.job_id, request_json=req.model_dump_json(), shards=self.shards)
        progress_files = [shard_progress_path(root, args.job_id, i, self.shards) for i in range(self.shards)]

        def report_progress() -> bool:  # polled while the Job runs; never asks to stop
            progress(sum(_read_progress(p) for p in progress_files))
            return False

        outcome = KubernetesJobs().run(manifest, timeout_seconds=template.timeout_seconds, should_stop=report_progress)
        if not outcome.succeeded:
            last = [line for line in outcome.log_tail.splitlines() if line.strip()][-1:]
            detail = f"; last log line: {last[0][:300]}" if last else ""
            raise IsplitError(
                f"analysis Job {outcome.job_name} {outcome.status}: {outcome.reason} {outcome.message}".strip() + detail
            )
        paths = [shard_stats_path(root, args.job_id, i, self.shards) for i in range(self.shards)]
        return result_from_stats(merge([load_stats(p) for p in paths]))


def _read_progress(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def analysis_compute(settings: Settings) -> IndexedJobAnalysis | None:
    """How the analyzer's child computes an analysis: None = inline (``isplit.analysis``)."""
    if settings.analyzer_executor != "kubernetes":
        return None
    if not settings.analyzer_job_template:
        raise IsplitError("ISPLIT_ANALYZER_JOB_TEMPLATE is required with ISPLIT_ANALYZER_EXECUTOR=kubernetes")
    return IndexedJobAnalysis(settings.analyzer_job_template, settings.analyzer_shards)


def cancel_analysis(settings: Settings, analysis_id: str) -> None:
    """Delete the analysis's Job with its pods (kubernetes executor; nothing to do inline)."""
    if settings.analyzer_executor != "kubernetes" or not settings.analyzer_job_template:
        return
    template = AnalysisJobTemplate.from_json(settings.analyzer_job_template)
    try:
        KubernetesJobs().delete(analysis_job_name(analysis_id), template.namespace)
    except Exception:  # the cancel itself stands; a leftover Job ends by its deadline and TTL
        log.exception("deleting the Job of cancelled analysis %s failed", analysis_id)


# -- inside a pod of the Indexed Job ---------------------------------------------------------


def analyze_shard(settings: Settings | None = None) -> int:
    """``isplit-analyzer analyze-shard``: compute shard ``$JOB_COMPLETION_INDEX`` of
    ``$ISPLIT_ANALYSIS_SHARDS`` of the analysis in ``$ISPLIT_ANALYSIS_JSON`` and write its stats
    and progress to the artifact volume. Exit 2 for errors the request causes, 0 when done."""
    settings = settings or get_settings()
    from isplit.training import pick_device

    try:
        analysis_id = os.environ[ANALYSIS_ID_ENV]
        req = AcceptedAnalysis.model_validate_json(os.environ[ANALYSIS_JSON_ENV])
        index, count = int(os.environ[INDEX_ENV]), int(os.environ[SHARDS_ENV])
        root = settings.artifact_root
        progress_file = shard_progress_path(root, analysis_id, index, count)
        progress_file.parent.mkdir(parents=True, exist_ok=True)
        last = [0.0]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last[0] > 1.0:
                last[0] = now
                progress_file.write_text(str(done))

        shard = run_shard(
            model_path(root, req.model_id),
            req.dataset,
            index=index,
            count=count,
            arch=req.arch,
            classes=req.classes,
            max_images=req.options.max_images,
            batch_size=req.options.batch_size,
            target=req.options.target,
            device=pick_device(settings.analyzer_device),
            progress=progress,
        )
        save_stats(shard, shard_stats_path(root, analysis_id, index, count))
        progress_file.write_text(str(int(shard.stats.counts.sum())))
    except (KeyError, ValueError, IsplitError) as exc:  # a missing or bad variable, or a bad request
        print(f"isplit-analyzer analyze-shard: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    print(f"shard {index} of {count}: {int(shard.stats.counts.sum())} images in {shard.meta.seconds:.2f} s")
    return 0
