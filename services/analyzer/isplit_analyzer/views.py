"""Stored jobs, candidates and models as the API shows them (storage models -> schemas)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from isplit.analysis import load_result
from isplit.export import HEAD_FORMATS, PROGRAM_FILE
from isplit.plan import (
    DEFAULT_DEPLOYMENT,
    DeploymentSpec,
    Plan,
    measured_from_results,
    plan_analysis,
    resolve_deployment,
)
from isplit.stats import cut_predictors, spearman
from isplit_analyzer.jobs import report_dir
from isplit_analyzer.schemas import (
    AnalysisSummary,
    AnalysisView,
    CandidateView,
    Correlation,
    HeadArtifact,
    ModelView,
    PointView,
    Progress,
)
from isplit_analyzer.store import CandidateRow, Job, ModelRecord


def model_view(rec: ModelRecord) -> ModelView:
    info = rec.info
    return ModelView(
        model_id=rec.id,
        owner=rec.owner,
        arch=rec.arch,
        sha256=rec.sha256,
        size_bytes=rec.size_bytes,
        num_classes=info["num_classes"],
        in_channels=info["in_channels"],
        input_size=info["input_size"],
        class_names=info["class_names"],
        test_accuracy=info.get("test_accuracy"),
    )


def summary(report: dict) -> AnalysisSummary:
    """The API's summary of an analysis report (``result.json`` as a dict)."""
    curve = report["curve"]
    return AnalysisSummary(
        best=curve["best"],
        candidates=curve["candidates"],
        ranking=report["ranking"],
        size_ranking=curve["size_ranking"],
        target=curve["target"],
        classes=report["classes"],
        num_images=curve["num_images"],
        seconds=report["seconds"],
        images_per_second=report["images_per_second"],
        points=[PointView.model_validate(p) for p in curve["points"]],
        per_class_best={k: v["best"] for k, v in curve["per_class"].items()},
    )


def correlation(rows: list[CandidateRow]) -> Correlation | None:
    """Spearman of measured split accuracy with each predictor, over the measured candidates."""
    measured = [r for r in rows if r.result and r.result.get("accuracy_split") is not None]
    if not measured:
        return None
    if len(measured) < 2:
        return Correlation(measured=len(measured), spearman_cui=None, spearman_size=None)
    accuracy = [r.result["accuracy_split"] for r in measured]  # type: ignore[index]
    predictors = cut_predictors([r.log10_cui for r in measured], [r.output_bytes for r in measured])
    return Correlation(
        measured=len(measured),
        spearman_cui=spearman(accuracy, predictors["cui"]),
        spearman_size=spearman(accuracy, predictors["size"]),
    )


HEAD_FILES = {**HEAD_FORMATS, "program": PROGRAM_FILE}  # format -> file name in the candidate's folder


def head_artifact_path(artifact_root: Path, candidate_id: str, fmt: str) -> Path | None:
    """The candidate's head file of format ``fmt`` (derived from the stored id and the fixed
    file names, never from request strings), or None when unknown or not written."""
    name = HEAD_FILES.get(fmt)
    if name is None:
        return None
    path = artifact_root / "candidates" / candidate_id / name
    return path if path.is_file() else None


def head_artifacts(row: CandidateRow, artifact_root: Path) -> list[HeadArtifact]:
    """The head files the trainer wrote for a measured candidate, with sizes and checksums."""
    if not row.result or row.result.get("status") != "succeeded":
        return []
    recorded: dict = {}
    meta = artifact_root / "candidates" / row.candidate_id / "head.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):  # listing works without head.json
        recorded = json.loads(meta.read_text()).get("artifacts") or {}
    found = []
    for fmt in HEAD_FILES:
        path = head_artifact_path(artifact_root, row.candidate_id, fmt)
        if path is None:
            continue
        entry = recorded.get(fmt) if isinstance(recorded.get(fmt), dict) else {}
        found.append(
            HeadArtifact(
                format=fmt,
                file=path.name,
                bytes=path.stat().st_size,
                sha256=entry.get("sha256") if isinstance(entry.get("sha256"), str) else None,
                opset=entry.get("opset") if isinstance(entry.get("opset"), int) else None,
                url=f"/v1/analyses/{row.analysis_id}/candidates/{row.candidate_id}/head/{fmt}",
            )
        )
    return found


def candidate_view(row: CandidateRow, artifact_root: Path | None = None) -> CandidateView:
    return CandidateView(
        candidate_id=row.candidate_id,
        cut=row.cut,
        predicted_rank=row.predicted_rank,
        size_rank=row.size_rank,
        cui=row.cui,
        log10_cui=row.log10_cui,
        output_bytes=row.output_bytes,
        published=row.published,
        measured=row.result,
        head_artifacts=head_artifacts(row, artifact_root) if artifact_root is not None else [],
    )


def analysis_view(job: Job, rows: list[CandidateRow], artifact_root: Path, full: bool) -> AnalysisView:
    """A job as ``GET /v1/analyses/{id}`` shows it; ``full`` adds the result and correlation."""
    result = plot_url = None
    report = report_dir(artifact_root, job.id) / "result.json"
    if full and report.exists():
        result = summary(json.loads(report.read_text()))
        plot_url = f"/v1/analyses/{job.id}/plot.png"
    return AnalysisView(
        id=job.id,
        owner=job.owner,
        status=job.status,  # type: ignore[arg-type]
        progress=Progress(
            images_done=job.images_done,
            images_total=job.images_total,
            fraction=min(1.0, job.images_done / max(job.images_total, 1)),
        ),
        request=job.request,
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        result=result,
        candidates=[candidate_view(r, artifact_root if full else None) for r in rows],
        correlation=correlation(rows) if full else None,
        plot_url=plot_url,
    )


def analysis_plan(job: Job, rows: list[CandidateRow], root: Path, query: DeploymentSpec) -> Plan | None:
    """The plan of a finished analysis for ``query`` laid over the deployment the job was
    submitted with (or ``DEFAULT_DEPLOYMENT``), measured accuracies included; None before the
    analysis has written its report."""
    folder = report_dir(root, job.id)
    if not (folder / "result.json").exists():
        return None
    result = load_result(folder)
    stored = job.request.get("deployment")
    base = DEFAULT_DEPLOYMENT.overlay(DeploymentSpec.model_validate(stored)) if stored else DEFAULT_DEPLOYMENT
    measured = measured_from_results([r.result for r in rows if r.result], subset=result.classes is not None)
    return plan_analysis(result, resolve_deployment(query, base), measured)
