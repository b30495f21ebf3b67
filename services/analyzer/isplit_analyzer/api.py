"""HTTP routes under /v1 (thin: validation here, work in jobs.py, state in store.py)."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from isplit import IsplitError
from isplit.bus import kafka_reachable
from isplit.checkpoint import load_model, sha256_file
from isplit.data import resolve_classes
from isplit.stats import spearman
from isplit_analyzer import metrics
from isplit_analyzer.jobs import model_path, new_job_id, report_dir
from isplit_analyzer.schemas import (
    Accepted,
    AnalysisPage,
    AnalysisRequest,
    AnalysisView,
    CandidateView,
    Correlation,
    ModelView,
    Progress,
)
from isplit_analyzer.store import CANCELLED, FINAL, QUEUED, RUNNING, CandidateRow, Job, ModelRecord

router = APIRouter()
BUILTIN_DATASETS = {"fashion-mnist": 10, "digits": 10}


def state(request: Request) -> Any:
    return request.app.state.isplit


def db(st: Any = Depends(state)) -> Any:
    with st.sessions() as s:
        yield s


# -- health ----------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "Kafka or the store is unreachable"}})
def readyz(st: Any = Depends(state), s: Session = Depends(db)) -> Any:
    """Readiness: the job store and Kafka answer."""
    checks = {"store": True, "kafka": kafka_reachable(st.settings.kafka_bootstrap, timeout_s=2.0)}
    try:
        s.execute(text("SELECT 1"))
    except Exception:
        checks["store"] = False
    if not all(checks.values()):
        raise HTTPException(503, f"not ready: {', '.join(k for k, v in checks.items() if not v)} unreachable")
    return {"status": "ready", "checks": checks}


# -- models ----------------------------------------------------------------------------------


def _model_view(rec: ModelRecord) -> ModelView:
    info = rec.info
    return ModelView(
        model_id=rec.id,
        arch=rec.arch,
        sha256=rec.sha256,
        size_bytes=rec.size_bytes,
        num_classes=info["num_classes"],
        in_channels=info["in_channels"],
        input_size=info["input_size"],
        class_names=info["class_names"],
        test_accuracy=info.get("test_accuracy"),
    )


@router.post(
    "/v1/models",
    status_code=201,
    response_model=ModelView,
    tags=["models"],
    responses={413: {"description": "upload too large"}, 422: {"description": "not a loadable checkpoint"}},
)
def upload_model(
    request: Request,
    file: UploadFile = File(..., description="an isplit checkpoint (`isplit zoo train`)"),
    arch: str | None = Form(default=None, description="if given, must match the checkpoint"),
    st: Any = Depends(state),
    s: Session = Depends(db),
) -> ModelView:
    """Upload weights; they are checked loadable without unpickling code, then stored."""
    limit = st.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise HTTPException(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    models_dir = st.settings.artifact_root / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=models_dir, suffix=".upload")
    tmp = Path(tmp_name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := file.file.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"upload exceeds the limit of {limit} bytes")
                out.write(chunk)
        try:
            _model, info = load_model(tmp, arch=arch)
        except IsplitError as exc:
            raise HTTPException(422, str(exc).replace(str(tmp), f"upload {file.filename!r}")) from None
        model_id = "m-" + uuid.uuid4().hex[:12]
        final = model_path(st.settings.artifact_root, model_id)
        tmp.replace(final)
        rec = ModelRecord(
            id=model_id, arch=info.arch, sha256=sha256_file(final), size_bytes=size, info=info.model_dump(mode="json")
        )
        s.add(rec)
        s.commit()
        return _model_view(rec)
    finally:
        tmp.unlink(missing_ok=True)


@router.get("/v1/models/{model_id}", response_model=ModelView, tags=["models"])
def get_model(model_id: str, s: Session = Depends(db)) -> ModelView:
    rec = s.get(ModelRecord, model_id)
    if rec is None:
        raise HTTPException(404, f"model {model_id!r} not found")
    return _model_view(rec)


# -- analyses --------------------------------------------------------------------------------


def _check_dataset(dataset: str, num_classes: int, data_root: Path) -> None:
    if dataset in BUILTIN_DATASETS:
        if BUILTIN_DATASETS[dataset] != num_classes:
            raise HTTPException(
                422, f"dataset {dataset!r} has {BUILTIN_DATASETS[dataset]} classes, the model has {num_classes}"
            )
        return
    if dataset.startswith("imagefolder:"):
        folder = Path(dataset.removeprefix("imagefolder:"))
        root = data_root.resolve()
        resolved = (root / folder).resolve() if not folder.is_absolute() else folder.resolve()
        if not resolved.is_relative_to(root):
            raise HTTPException(422, f"dataset folder {str(folder)!r} is outside the data root {str(root)!r}")
        if not resolved.is_dir():
            raise HTTPException(422, f"dataset folder {str(folder)!r} does not exist under {str(root)!r}")
        return
    raise HTTPException(422, f"unknown dataset {dataset!r}; use fashion-mnist, digits or imagefolder:<path>")


@router.post(
    "/v1/analyses",
    status_code=202,
    response_model=Accepted,
    tags=["analyses"],
    responses={422: {"description": "bad model, dataset, class list or options"}},
)
def submit_analysis(req: AnalysisRequest, request: Request, st: Any = Depends(state), s: Session = Depends(db)) -> Any:
    """Queue an analysis; poll the returned status URL."""
    rec = s.get(ModelRecord, req.model_id)
    if rec is None:
        raise HTTPException(422, f"model_id {req.model_id!r} not found; upload weights with POST /v1/models")
    if req.arch is not None and req.arch != rec.arch:
        raise HTTPException(422, f"arch {req.arch!r} does not match the uploaded model ({rec.arch!r})")
    _check_dataset(req.dataset, rec.info["num_classes"], st.settings.data_root)
    body = req.model_dump(mode="json")
    if req.dataset.startswith("imagefolder:"):
        folder = Path(req.dataset.removeprefix("imagefolder:"))
        body["dataset"] = "imagefolder:" + str((st.settings.data_root / folder).resolve())
    if req.classes is not None:
        try:
            body["classes"] = resolve_classes(req.classes, rec.info["class_names"])
        except IsplitError as exc:
            raise HTTPException(422, str(exc)) from None
    body["weights_sha256"] = rec.sha256
    job = Job(id=new_job_id(), status=QUEUED, request=body, images_total=req.options.max_images)
    s.add(job)
    s.commit()
    metrics.JOBS.labels(QUEUED).inc()
    url = f"/v1/analyses/{job.id}"
    return JSONResponse(
        Accepted(id=job.id, status=job.status, status_url=url).model_dump(), status_code=202, headers={"Location": url}
    )


def _view(job: Job, rows: list[CandidateRow], root: Path, full: bool) -> AnalysisView:
    total = max(job.images_total, 1)
    result = None
    plot_url = None
    rpath = report_dir(root, job.id) / "result.json"
    if full and rpath.exists():
        data = json.loads(rpath.read_text())
        curve = data["curve"]
        result = {
            "best": curve["best"],
            "candidates": curve["candidates"],
            "ranking": data["ranking"],
            "size_ranking": curve["size_ranking"],
            "target": curve["target"],
            "classes": data["classes"],
            "num_images": curve["num_images"],
            "seconds": data["seconds"],
            "images_per_second": data["images_per_second"],
            "points": [
                {k: p[k] for k in ("module", "kind", "skipped", "log10_cui", "cui", "output_shape", "output_bytes")}
                for p in curve["points"]
            ],
            "per_class_best": {k: v["best"] for k, v in curve["per_class"].items()},
        }
        plot_url = f"/v1/analyses/{job.id}/plot.png"
    cands = [
        CandidateView(
            candidate_id=r.candidate_id,
            cut=r.cut,
            predicted_rank=r.predicted_rank,
            size_rank=r.size_rank,
            cui=r.cui,
            log10_cui=r.log10_cui,
            output_bytes=r.output_bytes,
            published=r.published,
            measured=r.result,
        )
        for r in rows
    ]
    return AnalysisView(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        progress=Progress(
            images_done=job.images_done, images_total=job.images_total, fraction=min(1.0, job.images_done / total)
        ),
        request=job.request,
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        result=result,
        candidates=cands,
        correlation=_correlation(rows) if full else None,
        plot_url=plot_url,
    )


def _correlation(rows: list[CandidateRow]) -> Correlation | None:
    measured = [r for r in rows if r.result and r.result.get("accuracy_split") is not None]
    if not measured:
        return None
    acc = [r.result["accuracy_split"] for r in measured]  # type: ignore[index]
    if len(measured) < 2:
        return Correlation(measured=len(measured), spearman_cui=None, spearman_size=None)
    return Correlation(
        measured=len(measured),
        spearman_cui=spearman(acc, [r.cui for r in measured]),
        spearman_size=spearman(acc, [-r.size_rank for r in measured]),
    )


def _job_or_404(s: Session, analysis_id: str) -> Job:
    job = s.get(Job, analysis_id)
    if job is None:
        raise HTTPException(404, f"analysis {analysis_id!r} not found")
    return job


def _rows(s: Session, analysis_id: str) -> list[CandidateRow]:
    return list(
        s.scalars(
            select(CandidateRow).where(CandidateRow.analysis_id == analysis_id).order_by(CandidateRow.predicted_rank)
        )
    )


@router.get("/v1/analyses/{analysis_id}", response_model=AnalysisView, tags=["analyses"])
def get_analysis(analysis_id: str, st: Any = Depends(state), s: Session = Depends(db)) -> AnalysisView:
    """Status, progress, result, candidates and their measurements."""
    job = _job_or_404(s, analysis_id)
    return _view(job, _rows(s, analysis_id), st.settings.artifact_root, full=True)


@router.get("/v1/analyses", response_model=AnalysisPage, tags=["analyses"])
def list_analyses(
    limit: int = Query(20, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000),
    status: str | None = Query(None, pattern="^(queued|running|analysed|succeeded|failed|cancelled)$"),
    st: Any = Depends(state),
    s: Session = Depends(db),
) -> AnalysisPage:
    """Newest first, paginated."""
    q = select(Job)
    count = select(func.count()).select_from(Job)
    if status:
        q, count = q.where(Job.status == status), count.where(Job.status == status)
    jobs = s.scalars(q.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    items = [_view(j, _rows(s, j.id), st.settings.artifact_root, full=False) for j in jobs]
    return AnalysisPage(items=items, total=s.scalar(count) or 0, limit=limit, offset=offset)


@router.get(
    "/v1/analyses/{analysis_id}/plot.png",
    tags=["analyses"],
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}},
        404: {"description": "no such analysis"},
        409: {"description": "not analysed yet"},
    },
)
def get_plot(analysis_id: str, st: Any = Depends(state), s: Session = Depends(db)) -> FileResponse:
    """The CUI curve beside the size curve, candidates marked."""
    job = _job_or_404(s, analysis_id)
    path = report_dir(st.settings.artifact_root, job.id) / "curve.png"
    if not path.exists():
        raise HTTPException(409, f"analysis {analysis_id!r} has no plot yet (status {job.status})")
    return FileResponse(path, media_type="image/png")


@router.delete("/v1/analyses/{analysis_id}", response_model=AnalysisView, tags=["analyses"])
def cancel_analysis(analysis_id: str, st: Any = Depends(state), s: Session = Depends(db)) -> AnalysisView:
    """Cancel a queued or running analysis (409 once it has finished)."""
    job = _job_or_404(s, analysis_id)
    if job.status in FINAL:
        raise HTTPException(409, f"analysis {analysis_id!r} already {job.status}")
    if job.status not in (QUEUED, RUNNING):
        raise HTTPException(409, f"analysis {analysis_id!r} is publishing its candidates and cannot be cancelled")
    job.status = CANCELLED
    job.error = "cancelled by request"
    s.commit()
    st.runner.cancel(analysis_id)
    metrics.JOBS.labels(CANCELLED).inc()
    return _view(job, _rows(s, analysis_id), st.settings.artifact_root, full=False)
