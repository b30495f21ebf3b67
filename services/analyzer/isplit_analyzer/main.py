"""``isplit-analyzer``: run the analyzer with uvicorn (settings from the environment)."""

from __future__ import annotations

import logging

import uvicorn

from isplit_analyzer.api.limits import protocol_with_header_timeout
from isplit_analyzer.app import create_app
from isplit_analyzer.config import get_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.analyzer_host,
        port=settings.analyzer_port,
        log_level="warning",
        http=protocol_with_header_timeout(settings.header_timeout_seconds),
        h11_max_incomplete_event_size=32 * 1024,  # request line + headers, bytes
    )


if __name__ == "__main__":
    main()
