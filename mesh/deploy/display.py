"""Prints a run as ansible-playbook does (PLAY, TASK, ok/changed/fatal lines, the recap), plain text, colored
on a terminal. It owns the transcript's wording; it must not decide results.
"""

from __future__ import annotations

import json
import threading
from typing import Any, TextIO

from mesh.deploy.results import TaskResult

WIDTH = 80
_COLORS = {"ok": "32", "changed": "33", "failed": "31", "unreachable": "31", "skipped": "36", "warn": "35"}


def banner(text: str) -> str:
    """`TASK [name] ****...` padded with stars to 80 columns (3 at least), as Ansible's banner."""
    text = text.strip()
    return f"{text} {'*' * max(WIDTH - len(text), 3)}"


def item_label(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)


def dump(result: TaskResult) -> str:
    """The `=> {...}` part of a failed or unreachable line."""
    shown: dict[str, Any] = {"changed": False, **result.data}
    if result.msg:
        shown["msg"] = result.msg
    if result.status == "unreachable":
        shown["unreachable"] = True
    return json.dumps(shown, sort_keys=True, default=str)


class Display:
    """Writes the transcript to a stream; safe to call from the host threads."""

    def __init__(self, stream: TextIO, color: bool | None = None) -> None:
        self._stream = stream
        self._color = stream.isatty() if color is None else color
        self._lock = threading.Lock()

    def line(self, text: str, kind: str | None = None) -> None:
        if self._color and kind in _COLORS:
            text = f"\033[0;{_COLORS[kind]}m{text}\033[0m"
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def header(self, text: str) -> None:
        self.line("\n" + banner(text))

    def warning(self, text: str) -> None:
        self.line(f"[WARNING]: {text}", "warn")

    def result(self, host: str, result: TaskResult, item: Any = None, in_loop: bool = False) -> None:
        """One host's line for a task, or for one item of a loop (in_loop)."""
        suffix = f" => (item={item_label(item)})" if in_loop else ""
        status = result.status
        if status in ("ok", "changed"):
            self.line(f"{status}: [{host}]{suffix}", status)
        elif status == "skipped":
            self.line(f"skipping: [{host}]{suffix}", status)
        elif status == "unreachable":
            self.line(f"fatal: [{host}]: UNREACHABLE! => {dump(result)}", status)
        elif in_loop:
            self.line(f"failed: [{host}] (item={item_label(item)}) => {dump(result)}", "failed")
        else:
            self.line(f"fatal: [{host}]: FAILED! => {dump(result)}", "failed")
            if result.ignored:
                self.line("...ignoring", "skipped")
