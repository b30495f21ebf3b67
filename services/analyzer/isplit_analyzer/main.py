"""``isplit-analyzer``: run the analyzer with uvicorn (settings from the environment), or, in a
pod of an analysis's Indexed Job, one shard of it (``analyze-shard``)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from isplit.httpguard import protocol_with_header_timeout
from isplit_analyzer.app import create_app
from isplit_analyzer.config import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isplit-analyzer", description="isplit analyzer service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "analyze-shard"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if args.command == "analyze-shard":
        from isplit_analyzer.executors import analyze_shard

        return analyze_shard(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.analyzer_host,
        port=settings.analyzer_port,
        log_level="warning",
        http=protocol_with_header_timeout(settings.header_timeout_seconds),
        h11_max_incomplete_event_size=32 * 1024,  # request line + headers, bytes
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
