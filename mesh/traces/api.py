"""The traces API's answer (the controller's loopback web server serves it at `GET /api/traces`). Pure: a store
and the query's parameters in, (HTTP status, JSON document) out.

Exactly one of:
- `trace_id=HEX` (32 hex digits, or 16: a 64-bit id widened with zeros): that trace;
- `request_id=ID` (x-request-id): every trace holding a span of that request;
- `last=N` (1..MAX_LAST), optionally with `service=NAME`: the N newest traces (with a span of that service).

Answer: `{"traces": [[span, ...], ...]}` (each span Span.to_json(), by start time); 400 `{"error": ...}` for any
other query.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh.traces.store import TraceStore

MAX_LAST = 500
MAX_PARAM = 256
_HEX = frozenset("0123456789abcdef")
_SELECTORS = ("trace_id", "request_id", "last")
_KNOWN = frozenset({*_SELECTORS, "service"})


def traces_api(store: TraceStore, query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        return _bad(f"unknown parameter {unknown[0]!r}; expected one of trace_id, request_id, last (with service)")
    given = [name for name in _SELECTORS if name in query]
    if len(given) != 1:
        return _bad("give exactly one of trace_id, request_id, last")
    if any(len(value) > MAX_PARAM for value in query.values()):
        return _bad(f"a parameter is longer than {MAX_PARAM} characters")
    service = query.get("service")
    if service is not None and (given != ["last"] or not service):
        return _bad("service goes with last, and names a service")
    if given == ["trace_id"]:
        trace_id = query["trace_id"].lower()
        if len(trace_id) not in (16, 32) or not set(trace_id) <= _HEX:
            return _bad(f"trace_id: expected 32 (or 16) hex digits, got {query['trace_id']!r}")
        spans = store.trace(trace_id.rjust(32, "0"))
        return 200, {"traces": [[span.to_json() for span in spans]] if spans else []}
    if given == ["request_id"]:
        request_id = query["request_id"]
        if not request_id:
            return _bad("request_id: empty")
        by_trace: dict[str, list[dict[str, Any]]] = {}
        for span in store.by_request(request_id):
            by_trace.setdefault(span.trace_id, []).append(span.to_json())
        return 200, {"traces": list(by_trace.values())}
    text = query["last"]
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LAST:
        return _bad(f"last: expected a number from 1 to {MAX_LAST}, got {text!r}")
    return 200, {"traces": [[span.to_json() for span in spans] for spans in store.last(int(text), service)]}


def _bad(message: str) -> tuple[int, dict[str, Any]]:
    return 400, {"error": message}
