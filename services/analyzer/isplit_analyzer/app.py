"""The analyzer's FastAPI application: wiring, error handling, metrics middleware."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from isplit_analyzer import metrics
from isplit_analyzer.api import router
from isplit_analyzer.config import Settings, get_settings
from isplit_analyzer.jobs import JobRunner
from isplit_analyzer.results import ResultsConsumer
from isplit_analyzer.store import make_engine, session_factory

log = logging.getLogger("isplit.analyzer")


@dataclass
class State:
    settings: Settings
    sessions: sessionmaker[Session]
    runner: JobRunner
    results: ResultsConsumer


def problem(status: int, title: str, detail: str) -> JSONResponse:
    """An RFC 9457 problem-details response."""
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        got = err.get("input")
        shown = repr(got)[:60] if got is not None and not isinstance(got, dict) else ""
        parts.append(f"{loc}: {err.get('msg')}" + (f" (got {shown})" if shown else ""))
    return "; ".join(parts) or "invalid request"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        db_url = settings.db_url()
        sessions = session_factory(make_engine(db_url))
        runner = JobRunner(settings, sessions, db_url)
        results = ResultsConsumer(settings.kafka_bootstrap, settings.results_group, sessions, settings.topics())
        app.state.isplit = State(settings, sessions, runner, results)
        runner.start()
        results.start()
        log.info("analyzer ready: artifacts %s, db %s", settings.artifact_root, db_url)
        try:
            yield
        finally:
            results.stop()
            runner.stop()

    app = FastAPI(
        title="isplit analyzer",
        version="1.0.0",
        description="Submit I-SPLIT analysis jobs; candidates go to Kafka for retraining.",
        lifespan=lifespan,
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {
            400: "Bad Request",
            404: "Not Found",
            409: "Conflict",
            413: "Payload Too Large",
            422: "Unprocessable Content",
            503: "Service Unavailable",
        }.get(exc.status_code, "Error")
        return problem(exc.status_code, title, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "Unprocessable Content", _describe_validation(exc))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(500, "Internal Server Error", f"internal error ({type(exc).__name__}); see the service log")

    @app.middleware("http")
    async def _observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # counted as 500, answered as a problem
            log.exception("unhandled error")
            response = problem(500, "Internal Server Error", f"internal error ({type(exc).__name__})")
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.HTTP_SECONDS.labels(path, request.method, str(response.status_code)).observe(
            time.perf_counter() - start
        )
        return response

    @app.get("/metrics", include_in_schema=False)
    def _metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return app
