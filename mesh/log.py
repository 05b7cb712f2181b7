"""structlog set-up: readable lines in a terminal, JSON lines when asked (`--log-format json` or
MESH_LOG_FORMAT=json). Logs go to stderr; stdout is kept for what a command prints as its result.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(log_format: str | None = None, verbose: bool = False) -> None:
    chosen = log_format or os.environ.get("MESH_LOG_FORMAT", "console")
    renderer: structlog.typing.Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
