"""HTTP plumbing both HTTP services share (the analyzer's API and the tail-serving gateway):
RFC 9457 problem responses, request bodies bounded in bytes and time as they arrive, and
request headers bounded in time.

``problem`` is the one problem-details response.

``RequestBodyGuard`` (ASGI middleware) answers 413 before reading a body whose Content-Length
exceeds the route's limit, and stops reading a body (chunked or lying) once the bytes received
pass it; it answers 408 when a body pauses longer than the idle timeout or takes longer than
the total timeout. ``protocol_with_header_timeout`` gives Uvicorn an HTTP protocol that closes
a connection whose request headers have not arrived in time (Uvicorn's own keep-alive timeout
starts only after a first response).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem-details response."""
    return JSONResponse(
        {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
        headers=dict(headers) if headers else None,
    )


class BodyRefused(HTTPException):
    """A body over its limit (413) or too slow (408); raised from ``receive`` so the route's
    body parsing stops at once and the app's handler answers a problem."""


def content_length(scope: Scope) -> int | None:
    """The request's declared body size in bytes (None when absent or not a number)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class RequestBodyGuard:
    """Bound each HTTP request body: ``limit_for(scope)`` bytes, ``idle_s`` between chunks,
    ``total_s`` in all (seconds)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int], idle_s: float, total_s: float) -> None:
        self.app, self.limit_for, self.idle_s, self.total_s = app, limit_for, idle_s, total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = content_length(scope)
        if declared is not None and declared > limit:
            detail = f"request body of {declared} bytes exceeds the limit of {limit} bytes"
            await problem(413, detail, {"Connection": "close"})(scope, receive, send)
            return
        received, done = 0, False
        deadline = time.monotonic() + self.total_s

        async def guarded() -> Message:
            nonlocal received, done
            if done:  # after the body: disconnect listeners wait as long as they like
                return await receive()
            wait = min(self.idle_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                raise BodyRefused(408, "request body not received in time", {"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyRefused(413, f"request body exceeds the limit of {limit} bytes", {"Connection": "close"})
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded, tracked)
        except BodyRefused as exc:  # raised where no handler turned it into a response
            if started:
                raise
            await problem(exc.status_code, str(exc.detail), {"Connection": "close"})(scope, receive, send)


class HeaderTimeoutH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol, closing a connection whose next request's headers have not
    arrived ``header_timeout_s`` seconds after it opened or after its last response."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self.loop.call_later(self.header_timeout_s, self._header_deadline, self.cycle)

    def _header_deadline(self, cycle_when_armed: object) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.cycle is cycle_when_armed and not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[H11Protocol]:
    """The protocol class to give ``uvicorn.run(http=...)``."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": seconds})
