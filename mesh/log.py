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
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


class _StderrLogger:
    """Writes each line to whatever sys.stderr is at the time (tests and pipes swap it)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_args: object) -> _StderrLogger:
    return _StderrLogger()
