"""Uploaded checkpoints: ``POST /v1/models`` and ``GET /v1/models/{model_id}``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile

from isplit import IsplitError, exported
from isplit.checkpoint import load_model, sha256_file
from isplit_analyzer.api.deps import SessionDep, SettingsDep
from isplit_analyzer.jobs import model_path, new_model_id
from isplit_analyzer.schemas import ModelView
from isplit_analyzer.store import ModelRecord
from isplit_analyzer.views import model_view

router = APIRouter(prefix="/v1/models", tags=["models"])
SLACK_BYTES = 64 * 1024  # multipart framing around the file itself


@router.post(
    "",
    status_code=201,
    response_model=ModelView,
    responses={413: {"description": "upload too large"}, 422: {"description": "not a loadable checkpoint"}},
)
def upload_model(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
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
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + SLACK_BYTES:
        raise HTTPException(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
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
            id=model_id, arch=info.arch, sha256=sha256_file(final), size_bytes=size, info=info.model_dump(mode="json")
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


@router.get("/{model_id}", response_model=ModelView, responses={404: {"description": "no such model"}})
def get_model(model_id: str, session: SessionDep) -> ModelView:
    rec = session.get(ModelRecord, model_id)
    if rec is None:
        raise HTTPException(404, f"model {model_id!r} not found")
    return model_view(rec)
