"""Uploaded checkpoints: ``POST /v1/models``, ``GET`` and ``DELETE /v1/models/{model_id}``.

An upload's body is bounded as it arrives (``RequestBodyGuard`` in ``isplit.httpguard``: the
declared Content-Length first, then the streamed count), so at most ``max_upload_bytes`` is
ever spooled; the checkpoint is then checked without unpickling code,
its metadata capped and its tensors compared with the declared model before it is built.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, File, Form, HTTPException, Response, UploadFile
from sqlalchemy import select
from sqlalchemy.orm import Session

from isplit import IsplitError, exported
from isplit.auth import Principal
from isplit.checkpoint import load_model, sha256_file
from isplit_analyzer.api.auth import AUTH_RESPONSES, Reader, Submitter, owned_or_404
from isplit_analyzer.api.deps import SessionDep, SettingsDep
from isplit_analyzer.jobs import model_path, new_model_id
from isplit_analyzer.schemas import ModelView
from isplit_analyzer.store import CANCELLED, FAILED, SUCCEEDED, CandidateRow, Job, ModelRecord
from isplit_analyzer.views import model_view

router = APIRouter(prefix="/v1/models", tags=["models"], responses=AUTH_RESPONSES)
NOT_FOUND = {404: {"description": "no such model (or another principal's)"}}


def _model_or_404(session: Session, model_id: str, principal: Principal) -> ModelRecord:
    return owned_or_404(session, ModelRecord, model_id, principal, "model")


@router.post(
    "",
    status_code=201,
    response_model=ModelView,
    responses={
        408: {"description": "the body did not arrive in time"},
        413: {"description": "upload too large"},
        422: {"description": "not a loadable checkpoint, or bad metadata or weights (named)"},
    },
)
def upload_model(
    settings: SettingsDep,
    session: SessionDep,
    principal: Submitter,
    file: UploadFile = File(..., description="an isplit checkpoint (`isplit zoo train`)"),
    arch: str | None = Form(default=None, description="if given, must match the checkpoint"),
    class_names: str | None = Form(default=None, description=".pt2 programs: comma-separated class names"),
    mean: str | None = Form(default=None, description=".pt2 programs: comma-separated per-channel mean"),
    std: str | None = Form(default=None, description=".pt2 programs: comma-separated per-channel std"),
) -> ModelView:
    """Upload weights (an isplit checkpoint or a ``torch.export`` program, ``.pt2``); they are
    checked loadable without running code from the file, then stored. A program's optional
    class names and normalisation are stored inside it (``extra/isplit.json``)."""
    meta = program_meta(class_names, mean, std)
    limit = settings.max_upload_bytes  # the body was bounded as it arrived; this bounds the file
    models_dir = settings.artifact_root / "models"
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
            _model, info = load_model(tmp, arch=arch, meta=meta)
            if meta is not None:
                if info.arch != exported.ARCH:
                    raise IsplitError("class_names, mean and std apply to torch.export programs (.pt2) only")
                exported.embed_meta(tmp, meta)
        except IsplitError as exc:  # name the upload, not the temporary file
            raise IsplitError(str(exc).replace(str(tmp), f"upload {file.filename!r}")) from None
        model_id = new_model_id()
        final = model_path(settings.artifact_root, model_id)
        tmp.replace(final)
        rec = ModelRecord(
            id=model_id,
            arch=info.arch,
            sha256=sha256_file(final),
            size_bytes=size,
            info=info.model_dump(mode="json"),
            owner=principal.name,
        )
        session.add(rec)
        session.commit()
        return model_view(rec)
    finally:
        tmp.unlink(missing_ok=True)


def program_meta(class_names: str | None, mean: str | None, std: str | None) -> exported.ProgramMeta | None:
    """The optional form fields of a ``.pt2`` upload (None when none is given; 422 when bad)."""
    fields: dict[str, list] = {}
    if class_names:
        fields["class_names"] = [t.strip() for t in class_names.split(",") if t.strip()]
    for name, text in (("mean", mean), ("std", std)):
        if text:
            try:
                fields[name] = [float(t) for t in text.split(",")]
            except ValueError:
                raise HTTPException(422, f"{name} must be comma-separated numbers, got {text[:100]!r}") from None
    return exported.ProgramMeta(**fields) if fields else None


@router.get("/{model_id}", response_model=ModelView, responses=NOT_FOUND)
def get_model(model_id: str, session: SessionDep, principal: Reader) -> ModelView:
    return model_view(_model_or_404(session, model_id, principal))


def model_in_use(session: Session, model_id: str) -> str | None:
    """Why ``model_id`` cannot be deleted now: an analysis of it that has not finished, or a
    published candidate of it the trainer has not answered yet (it reads the weights); None
    when it can go."""
    for job in session.scalars(select(Job).where(Job.status.not_in((FAILED, CANCELLED)))):
        if job.request.get("model_id") != model_id:
            continue
        if job.status != SUCCEEDED:
            return f"analysis {job.id!r} of it is {job.status}"
        rows = session.scalars(select(CandidateRow).where(CandidateRow.analysis_id == job.id))
        if any(r.published and r.result is None for r in rows):
            return f"analysis {job.id!r} has candidates still training on it"
    return None


@router.delete(
    "/{model_id}",
    status_code=204,
    responses={**NOT_FOUND, 409: {"description": "an analysis or a training of it is still running"}},
)
def delete_model(model_id: str, settings: SettingsDep, session: SessionDep, principal: Submitter) -> Response:
    """Delete an uploaded model and its weights (its owner or an admin). Finished analyses
    keep their reports; 409 while an analysis of it runs or its candidates still train."""
    rec = _model_or_404(session, model_id, principal)
    busy = model_in_use(session, model_id)
    if busy:
        raise HTTPException(409, f"model {model_id!r} is in use: {busy}")
    session.delete(rec)
    session.commit()
    model_path(settings.artifact_root, model_id).unlink(missing_ok=True)
    return Response(status_code=204)
