"""``isplit-analyzer``: run the analyzer with uvicorn (settings from the environment)."""

from __future__ import annotations

import logging

import uvicorn

from isplit_analyzer.app import create_app
from isplit_analyzer.config import get_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.analyzer_host, port=settings.analyzer_port, log_level="warning")


if __name__ == "__main__":
    main()
