"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import text

from isplit.bus import kafka_reachable
from isplit_analyzer.api.deps import SessionDep, SettingsDep, StateDep
from isplit_analyzer.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers (on the event loop: no thread pool to wait for)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"description": "Kafka or the store is unreachable, or the results consumer is stalled"}},
)
def readyz(settings: SettingsDep, session: SessionDep, state: StateDep) -> Readiness:
    """Readiness: the job store and Kafka answer, and the results consumer keeps up."""
    checks = {"store": True, "kafka": kafka_reachable(settings.kafka_bootstrap, timeout_s=2.0)}
    try:
        session.execute(text("SELECT 1"))
    except Exception:  # any database error means "not ready", named in the answer
        checks["store"] = False
    if not all(checks.values()):
        raise HTTPException(503, f"not ready: {', '.join(k for k, v in checks.items() if not v)} unreachable")
    stalled = state.results.progress.stalled()
    if stalled is not None:
        raise HTTPException(503, f"not ready: results consumer stalled ({stalled})")
    return Readiness(status="ready", checks={**checks, "results_consumer": True})
