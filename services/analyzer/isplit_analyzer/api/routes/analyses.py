"""Analysis jobs: submit, read, list, plot and cancel, under ``/v1/analyses``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from isplit.auth import Principal
from isplit.data import DatasetRef, resolve_classes
from isplit.exported import NAMES_GIVEN
from isplit.plan import ENCODINGS, Plan, parse_deployment_spec
from isplit_analyzer import metrics
from isplit_analyzer.api.auth import AUTH_RESPONSES, Reader, Submitter, owned_or_404, visible
from isplit_analyzer.api.deps import RunnerDep, SessionDep, SettingsDep
from isplit_analyzer.jobs import new_job_id, report_dir
from isplit_analyzer.schemas import Accepted, AcceptedAnalysis, AnalysisPage, AnalysisRequest, AnalysisView
from isplit_analyzer.store import CANCELLED, FINAL, QUEUED, RUNNING, Job, ModelRecord, candidate_rows
from isplit_analyzer.views import HEAD_FILES, analysis_plan, analysis_view, head_artifact_path

router = APIRouter(prefix="/v1/analyses", tags=["analyses"], responses=AUTH_RESPONSES)
NOT_FOUND = {404: {"description": "no such analysis (or another principal's)"}}


def _job_or_404(session: Session, analysis_id: str, principal: Principal) -> Job:
    return owned_or_404(session, Job, analysis_id, principal, "analysis")


def accept(req: AnalysisRequest, model: ModelRecord | None, data_root: Path) -> AcceptedAnalysis:
    """Check ``req`` against the uploaded model and the data root; the request as the job
    stores it. Raises ``HTTPException`` 422 or ``IsplitError`` naming the bad value."""
    if model is None:
        raise HTTPException(422, f"model_id {req.model_id!r} not found; upload weights with POST /v1/models")
    if req.arch is not None and req.arch != model.arch:
        raise HTTPException(422, f"arch {req.arch!r} does not match the uploaded model ({model.arch!r})")
    dataset = DatasetRef.parse(req.dataset, root=data_root)
    known = dataset.builtin_classes
    if known is not None and len(known) != model.info["num_classes"]:
        raise HTTPException(
            422, f"dataset {req.dataset!r} has {len(known)} classes, the model has {model.info['num_classes']}"
        )
    return AcceptedAnalysis(
        **{
            **req.model_dump(),
            "dataset": dataset.spec,
            "classes": resolve_classes(req.classes, _class_names(model.info, known)),
            "weights_sha256": model.sha256,
        }
    )


def _class_names(info: dict, known: list[str] | None) -> list[str]:
    """The names a class subset is given in: the model's, or for a torch.export program
    uploaded without names the built-in dataset's (its classes are only numbered)."""
    if info.get("extra", {}).get(NAMES_GIVEN) is False and known is not None:
        return known
    return info["class_names"]


@router.post(
    "",
    status_code=202,
    response_model=Accepted,
    responses={422: {"description": "bad model, dataset, class list or options"}},
)
def submit_analysis(
    req: AnalysisRequest, settings: SettingsDep, session: SessionDep, principal: Submitter
) -> JSONResponse:
    """Queue an analysis of one of the principal's models; poll the returned status URL."""
    model = session.get(ModelRecord, req.model_id)
    accepted = accept(req, model if model and visible(model.owner, principal) else None, settings.data_root)
    job = Job(
        id=new_job_id(),
        status=QUEUED,
        request=accepted.model_dump(mode="json"),
        images_total=req.options.max_images,
        owner=principal.name,
    )
    session.add(job)
    session.commit()
    metrics.JOBS.labels(QUEUED).inc()
    url = f"/v1/analyses/{job.id}"
    body = Accepted(id=job.id, status=job.status, status_url=url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})


@router.get("/{analysis_id}", response_model=AnalysisView, responses=NOT_FOUND)
def get_analysis(analysis_id: str, settings: SettingsDep, session: SessionDep, principal: Reader) -> AnalysisView:
    """Status, progress, result, candidates and their measurements."""
    job = _job_or_404(session, analysis_id, principal)
    return analysis_view(job, candidate_rows(session, analysis_id), settings.artifact_root, full=True)


@router.get("", response_model=AnalysisPage)
def list_analyses(
    settings: SettingsDep,
    session: SessionDep,
    principal: Reader,
    limit: int = Query(20, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000),
    status: str | None = Query(None, pattern="^(queued|running|analysed|succeeded|failed|cancelled)$"),
) -> AnalysisPage:
    """The principal's analyses (an admin's: everyone's), newest first, paginated."""
    q = select(Job)
    count = select(func.count()).select_from(Job)
    if not principal.is_admin:
        q, count = q.where(Job.owner == principal.name), count.where(Job.owner == principal.name)
    if status:
        q, count = q.where(Job.status == status), count.where(Job.status == status)
    jobs = session.scalars(q.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    items = [analysis_view(j, candidate_rows(session, j.id), settings.artifact_root, full=False) for j in jobs]
    return AnalysisPage(items=items, total=session.scalar(count) or 0, limit=limit, offset=offset)


@router.get(
    "/{analysis_id}/plot.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **NOT_FOUND, 409: {"description": "not analysed yet"}},
)
def get_plot(analysis_id: str, settings: SettingsDep, session: SessionDep, principal: Reader) -> FileResponse:
    """The CUI curve beside the size curve, candidates marked."""
    job = _job_or_404(session, analysis_id, principal)
    path = report_dir(settings.artifact_root, job.id) / "curve.png"
    if not path.exists():
        raise HTTPException(409, f"analysis {analysis_id!r} has no plot yet (status {job.status})")
    return FileResponse(path, media_type="image/png")


@router.get(
    "/{analysis_id}/plan",
    response_model=Plan,
    responses={
        **NOT_FOUND,
        409: {"description": "not analysed yet"},
        422: {"description": "bad profile or constraint"},
    },
)
def get_plan(
    analysis_id: str,
    settings: SettingsDep,
    session: SessionDep,
    principal: Reader,
    device: str | None = Query(None, description="device preset (rpi4, mcu, phone)"),
    device_gflops: float | None = Query(None, description="effective GFLOP/s of the edge device"),
    link: str | None = Query(None, description="link preset (lte, wifi, lora, loopback)"),
    uplink_mbps: float | None = Query(None, description="uplink Mbit/s"),
    rtt_ms: float | None = Query(None, description="round trip ms"),
    server: str | None = Query(None, description="server preset (gpu, cpu)"),
    server_gflops: float | None = Query(None, description="effective GFLOP/s of the tail server"),
    use_registration_latency: bool | None = Query(None, description="tail time = TorchServe's measured latency"),
    encoding: str | None = Query(None, description=f"wire encoding: {', '.join(ENCODINGS)}"),
    max_head_flops_fraction: float | None = Query(None, description="head FLOPs / network FLOPs, (0, 1]"),
    max_latency_ms: float | None = Query(None, description="end-to-end latency per image"),
    max_payload_bytes: int | None = Query(None, description="bytes per image on the wire"),
    min_accuracy: float | None = Query(None, description="measured accuracy in [0, 1]"),
) -> Plan:
    """Which cut a deployment can use, recomputed from the stored results (measured accuracies
    included as they arrive). The parameters are those of `isplit plan` and override the
    deployment the analysis was submitted with; presets are assumptions, not measurements."""
    job = _job_or_404(session, analysis_id, principal)
    given = {k: v for k, v in locals().items() if k in PLAN_QUERY and v is not None}
    plan = analysis_plan(
        job, candidate_rows(session, analysis_id), settings.artifact_root, parse_deployment_spec(given, "query")
    )
    if plan is None:
        raise HTTPException(409, f"analysis {analysis_id!r} has no result yet (status {job.status})")
    return plan


PLAN_QUERY = (
    "device", "device_gflops", "link", "uplink_mbps", "rtt_ms", "server", "server_gflops", "use_registration_latency",
    "encoding", "max_head_flops_fraction", "max_latency_ms", "max_payload_bytes", "min_accuracy",
)  # fmt: skip


@router.get(
    "/{analysis_id}/candidates/{candidate_id}/head/{fmt}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "no such head artifact"}},
)
def get_head_artifact(
    analysis_id: str, candidate_id: str, fmt: str, settings: SettingsDep, session: SessionDep, principal: Reader
) -> FileResponse:
    """A trained candidate's head file: ``torchscript`` (head.pt), ``onnx`` (head.onnx),
    ``executorch`` (head.pte) or ``program`` (head.pt2), as listed in the candidate's
    ``head_artifacts``."""
    _job_or_404(session, analysis_id, principal)
    row = next((r for r in candidate_rows(session, analysis_id) if r.candidate_id == candidate_id), None)
    if row is None:
        raise HTTPException(404, f"analysis {analysis_id!r} has no candidate {candidate_id!r}")
    if fmt not in HEAD_FILES:
        raise HTTPException(404, f"unknown head format {fmt!r}; known: {', '.join(HEAD_FILES)}")
    path = head_artifact_path(settings.artifact_root, row.candidate_id, fmt)
    if path is None:
        raise HTTPException(404, f"candidate {candidate_id!r} has no {fmt} head")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.delete(
    "/{analysis_id}",
    response_model=AnalysisView,
    responses={**NOT_FOUND, 409: {"description": "already finished, or publishing"}},
)
def cancel_analysis(
    analysis_id: str, settings: SettingsDep, session: SessionDep, runner: RunnerDep, principal: Submitter
) -> AnalysisView:
    """Cancel a queued or running analysis (409 once it has finished)."""
    job = _job_or_404(session, analysis_id, principal)
    if job.status in FINAL:
        raise HTTPException(409, f"analysis {analysis_id!r} already {job.status}")
    if job.status not in (QUEUED, RUNNING):
        raise HTTPException(409, f"analysis {analysis_id!r} is publishing its candidates and cannot be cancelled")
    job.status = CANCELLED
    job.error = "cancelled by request"
    session.commit()
    runner.cancel(analysis_id)
    metrics.JOBS.labels(CANCELLED).inc()
    return analysis_view(job, candidate_rows(session, analysis_id), settings.artifact_root, full=False)
