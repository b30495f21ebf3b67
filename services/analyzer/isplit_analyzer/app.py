"""The analyzer's FastAPI application: lifespan wiring, metrics middleware, routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.engine import make_url

from isplit.auth import TokenStore
from isplit.httpguard import RequestBodyGuard
from isplit_analyzer import metrics
from isplit_analyzer.api import router
from isplit_analyzer.api.deps import State
from isplit_analyzer.api.errors import install_error_handlers, internal_error
from isplit_analyzer.config import Settings, get_settings
from isplit_analyzer.jobs import JobRunner
from isplit_analyzer.results import ResultsConsumer
from isplit_analyzer.store import make_engine, session_factory

log = logging.getLogger("isplit.analyzer")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the job store, start the job runner and the results consumer; stop them at exit."""
    settings: Settings = app.state.settings
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    db_url = settings.db_url()
    sessions = session_factory(make_engine(db_url))
    runner = JobRunner(settings, sessions, db_url)
    results = ResultsConsumer(
        settings.kafka_bootstrap, settings.results_group, sessions, settings.topics(), settings.consumer_stall_s
    )
    app.state.isplit = State(settings, sessions, runner, results)
    runner.start()
    results.start()
    shown = make_url(db_url).render_as_string(hide_password=True)
    log.info("analyzer ready: artifacts %s, db %s", settings.artifact_root, shown)
    if app.state.tokens.problem:
        log.warning(
            "no API token can authenticate (%s): every /v1 call answers 401; make one with "
            "`isplit token create --file %s`",
            app.state.tokens.problem,
            settings.analyzer_tokens_file,
        )
    try:
        yield
    finally:
        results.stop()
        runner.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="isplit analyzer",
        version="1.0.0",
        description="Submit I-SPLIT analysis jobs; candidates go to Kafka for retraining.",
        lifespan=lifespan,
    )
    app.state.settings = settings = settings or get_settings()
    app.state.tokens = TokenStore(settings.analyzer_tokens_file)
    install_error_handlers(app)

    def body_limit(scope: dict) -> int:
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/models"
        return settings.max_upload_bytes if upload else settings.max_request_bytes

    # Added before the metrics middleware so it sits inside it: a refusal raised from `receive`
    # reaches the route directly (the metrics middleware reads the body in a task group).
    app.add_middleware(
        RequestBodyGuard,
        limit_for=body_limit,
        idle_s=settings.body_idle_timeout_seconds,
        total_s=settings.body_timeout_seconds,
    )

    @app.middleware("http")
    async def _observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # counted as a 500 here, answered as a problem
            response = internal_error(exc)
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
