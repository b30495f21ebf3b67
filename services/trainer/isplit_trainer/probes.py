"""The trainer's HTTP endpoints on its metrics port: ``/metrics``, ``/healthz`` and ``/readyz``.

``/readyz`` answers 503 while the consumer loop is stalled (records waiting and no progress
for ``ISPLIT_CONSUMER_STALL_S`` seconds, see :class:`isplit.bus.ConsumerProgress`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from isplit.bus import ConsumerProgress


def probes_app(progress: ConsumerProgress) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: the Prometheus exposition, plus the liveness and readiness probes."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            reason = progress.stalled()
            if reason is not None:
                return _json(start_response, "503 Service Unavailable", {"status": "not ready", "reason": reason})
            return _json(start_response, "200 OK", {"status": "ready"})
        return metrics(environ, start_response)

    return app


def serve_probes(port: int, progress: ConsumerProgress, host: str = "0.0.0.0") -> None:
    """Serve :func:`probes_app` on ``host:port`` from a daemon thread."""
    server = make_server(host, port, probes_app(progress), ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log line per scrape
        pass


def _json(start_response: Callable[..., Any], status: str, body: dict[str, str]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
