"""The one mapping from errors to RFC 9457 problem-details responses.

``HTTPException`` keeps its status; a request that fails validation and an ``IsplitError``
(bad input the library found: an unknown dataset or class, weights that do not load) are 422;
anything else is a 500 that names the exception type, never a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from isplit import IsplitError
from isplit.httpguard import problem
from isplit.messages import summarize_errors

log = logging.getLogger("isplit.analyzer")


def internal_error(exc: Exception) -> JSONResponse:
    """A 500 for an unhandled exception, logged with its traceback."""
    log.error("unhandled error", exc_info=exc)
    return problem(500, f"internal error ({type(exc).__name__})")


def describe_validation(exc: RequestValidationError) -> str:
    """One line naming each bad field (up to five), what is wrong and the value given."""
    return summarize_errors(exc.errors(), skip_loc=("body",)) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, describe_validation(exc))

    @app.exception_handler(IsplitError)
    async def _user_error(_request: Request, exc: IsplitError) -> JSONResponse:
        return problem(422, str(exc))
