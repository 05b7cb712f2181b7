"""What `mesh trace` shows: spans grouped into traces, each trace's tree (parent links, self time, offset from the
trace's start), the hops rebuilt from access lines when no collector has the request, and the text and JSON views.

Pure: spans and access lines in, text and JSON out; it must not reach a host or a controller (cli.py and
sources.py do).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal
from urllib.parse import urlsplit

from mesh.telemetry.accesslog import AccessLine
from mesh.traces.model import Span

Source = Literal["collector", "access logs"]

# Envoy's own span tags (its Zipkin and OpenTelemetry tracers write these), and mesh's (design 2)
METHOD_TAG, URL_TAG, STATUS_TAG, FLAGS_TAG = "http.method", "http.url", "http.status_code", "response_flags"
REQUEST_ID_TAG = "guid:x-request-id"
DIRECTION_TAG, HOST_TAG, PROXY_TAG, UPSTREAM_TAG = "mesh.direction", "mesh.host", "mesh.proxy", "mesh.upstream"
SERVICE_TAG, VERSION_TAG = "mesh.service", "mesh.version"
PATH_WIDTH = 60  # a longer path is cut, ending in `…`
CLOCK_SLACK_US = 50_000  # how far two hosts' clocks may disagree when hops are matched by start time


@dataclass(frozen=True)
class Row:
    """One span in its trace's tree: its depth, whether it is its parent's last child (for the tree's lines), the
    effective parent (None for a root: no parent, or one the trace does not hold), self time and offset."""

    span: Span
    depth: int
    parent_id: str | None
    children: tuple[str, ...]
    self_us: int
    offset_us: int
    prefix: str  # the tree's drawing before the service: `├─ `, `│  └─ `...


@dataclass(frozen=True)
class Trace:
    """One trace as `mesh trace` shows it: its spans in tree order (depth first, children by start time)."""

    trace_id: str | None  # None: hops from access lines that carry no trace id
    rows: tuple[Row, ...]
    source: Source

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(row.span for row in self.rows)

    @property
    def start_us(self) -> int:
        return min(span.start_us for span in self.spans)

    @property
    def end_us(self) -> int:
        return max(span.start_us + span.duration_us for span in self.spans)

    @property
    def duration_us(self) -> int:
        return self.end_us - self.start_us

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The request ids the spans carry, in tree order, each once."""
        return tuple(dict.fromkeys(span.request_id for span in self.spans if span.request_id))


# ---- traces from spans -------------------------------------------------------------------------------------


def distinct_spans(spans: Iterable[Span]) -> list[Span]:
    """Each span once (by trace and span id; the first copy kept): several controllers may answer with the same
    span, and one controller with the same span under two queries."""
    seen: dict[tuple[str, str], Span] = {}
    for span in spans:
        seen.setdefault((span.trace_id, span.span_id), span)
    return list(seen.values())


def group_traces(spans: Iterable[Span], source: Source = "collector") -> list[Trace]:
    """The spans as traces (one per trace id, spans deduplicated), newest trace first."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for span in distinct_spans(spans):
        by_trace[span.trace_id].append(span)
    traces = [build_trace(found, source, trace_id or None) for trace_id, found in by_trace.items()]
    return newest_first(traces)


def newest_first(traces: Iterable[Trace]) -> list[Trace]:
    return sorted(traces, key=lambda trace: (-trace.start_us, trace.trace_id or ""))


def _start_order(span: Span) -> tuple[int, str]:
    return span.start_us, span.span_id


def build_trace(spans: Sequence[Span], source: Source, trace_id: str | None) -> Trace:
    """The tree of one trace's spans. A span whose parent is not among them is a root (the caller's own span, or
    one that reached a controller that did not answer); spans in a parent cycle (a hostile or broken sender) are
    shown as roots too, so every span is shown once. Iterative: a trace may hold a thousand spans in a chain."""
    by_id: dict[str, Span] = {}
    for span in spans:
        by_id.setdefault(span.span_id, span)
    spans = list(by_id.values())
    children: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        if span.parent_id is not None and span.parent_id in by_id and span.parent_id != span.span_id:
            children[span.parent_id].append(span)
    for kids in children.values():
        kids.sort(key=_start_order)
    roots = sorted((span for span in spans if span.parent_id not in by_id or span.parent_id == span.span_id),
                   key=_start_order)
    start = min((span.start_us for span in spans), default=0)
    rows: list[Row] = []
    shown: set[str] = set()
    pending = sorted(spans, key=_start_order)
    while len(shown) < len(by_id):
        if not roots:  # what is left hangs in a cycle: its earliest span starts a tree of its own
            roots = [next(span for span in pending if span.span_id not in shown)]
        stack: list[tuple[Span, int, str | None, str, bool]] = [
            (root, 0, None, "", index == len(roots) - 1) for index, root in reversed(list(enumerate(roots)))]
        roots = []
        while stack:
            span, depth, parent, lines, last = stack.pop()
            if span.span_id in shown:
                continue
            shown.add(span.span_id)
            kids = [kid for kid in children.get(span.span_id, ()) if kid.span_id not in shown]
            prefix = "" if depth == 0 else lines + ("└─ " if last else "├─ ")
            rows.append(Row(span, depth, parent, tuple(kid.span_id for kid in kids), self_time(span, kids),
                            span.start_us - start, prefix))
            below = "" if depth == 0 else lines + ("   " if last else "│  ")
            for index in reversed(range(len(kids))):
                stack.append((kids[index], depth + 1, span.span_id, below, index == len(kids) - 1))
    return Trace(trace_id, tuple(rows), source)


def self_time(span: Span, children: Iterable[Span]) -> int:
    """The span's time not covered by any of its children (their intervals merged, clipped to the span's own:
    clocks of two hosts may disagree a little), in microseconds, never below 0."""
    begin, end = span.start_us, span.start_us + span.duration_us
    intervals = sorted((max(begin, kid.start_us), min(end, kid.start_us + kid.duration_us)) for kid in children)
    covered, reach = 0, begin
    for low, high in intervals:
        low = max(low, reach)
        if high > low:
            covered += high - low
            reach = high
    return max(0, span.duration_us - covered)


# ---- hops from access lines --------------------------------------------------------------------------------

Placement = Mapping[str, tuple[str, str | None]]  # the access line's `proxy` (a Consul id) -> (host, container)


def hop_span(line: AccessLine, host: str | None) -> Span:
    """An access line as a span: SERVER for an inbound line, CLIENT for an outbound one; its id made from the
    line itself (stable: the same line read twice is the same span). Parents are set by hops_from_lines."""
    get = line.get
    direction = str(get("direction") or "")
    proxy = str(get("proxy") or "")
    start_us = _epoch_us(line)
    duration_us = max(0, int(_number(get("duration_ms")) * 1000))
    service = get("destination_service") if direction == "inbound" else get("source_service")
    tags: dict[str, str] = {DIRECTION_TAG: direction, PROXY_TAG: proxy}
    if host:
        tags[HOST_TAG] = host
    _put(tags, REQUEST_ID_TAG, get("request_id"))
    _put(tags, METHOD_TAG, get("method"))
    if get("path") is not None:
        tags[URL_TAG] = f"http://{get('authority') or ''}{get('path')}"
    _put(tags, STATUS_TAG, get("status"))
    _put(tags, FLAGS_TAG, get("response_flags"))
    _put(tags, SERVICE_TAG, service)
    if direction == "outbound":
        _put(tags, UPSTREAM_TAG, get("destination_service"))
    seed = "\0".join(str(part) for part in (proxy, direction, line.time.isoformat(), get("request_id"),
                                              get("source_address"), duration_us))
    return Span(
        trace_id=_trace_id(get("trace_id")) or "",
        span_id=hashlib.sha256(seed.encode()).hexdigest()[:16],
        parent_id=None,
        name=f"{direction} {service or '?'}",
        kind="SERVER" if direction == "inbound" else "CLIENT",
        start_us=start_us,
        duration_us=duration_us,
        service=str(service) if service else None,
        tags=tags,
    )


def hops_from_lines(lines: Iterable[AccessLine], placement: Placement) -> tuple[Span, ...]:
    """The HTTP access lines of one request as spans with parent links: the outbound line of S calling U is the
    parent of U's inbound line that S's proxy sent (its `source_instance`); an inbound line of S is the parent of
    the outbound lines S's proxy started while it lasted. Among several candidates (retries, an id sent twice)
    the latest that started before the child wins (or, when none did, the first that started at most
    CLOCK_SLACK_US after it: hosts' clocks differ a little); at most SCAN_BACK candidates are looked at either way,
    so that an id sent a million times still costs n log n. TCP lines carry no request id and are
    never hops."""
    http_lines = [line for line in lines if line.get("protocol") != "tcp" and line.get("method") is not None]
    spans = [hop_span(line, placement.get(str(line.get("proxy") or ""), (None, None))[0]) for line in http_lines]
    callers: dict[tuple[str, str], list[int]] = defaultdict(list)  # (caller proxy, callee service) -> outbound
    served: dict[str, list[int]] = defaultdict(list)  # proxy -> its inbound lines
    for index in sorted(range(len(spans)), key=lambda index: _start_order(spans[index])):
        line = http_lines[index]
        if line.get("direction") == "outbound":
            callers[(str(line.get("proxy")), str(line.get("destination_service")))].append(index)
        elif line.get("direction") == "inbound":
            served[str(line.get("proxy"))].append(index)
    linked = []
    for line, span in zip(http_lines, spans, strict=True):
        fits: Callable[[int], bool]
        if line.get("direction") == "inbound":
            candidates = callers.get((str(line.get("source_instance")), str(line.get("destination_service"))), [])
            fits = partial(_sent_to, http_lines, line.get("proxy"))
        else:
            candidates = served.get(str(line.get("proxy")), [])
            fits = partial(_open_at, spans, span.start_us)
        parent = _latest_before(span, candidates, spans, fits)
        linked.append(replace(span, parent_id=parent.span_id if parent is not None else None))
    return tuple(sorted(linked, key=_start_order))


SCAN_BACK = 64


def _sent_to(lines: list[AccessLine], proxy: object, other: int) -> bool:
    """The outbound line `other` went to that proxy (or does not say which instance it reached)."""
    return lines[other].get("destination_instance") in (None, "", "-", proxy)


def _open_at(spans: list[Span], start_us: int, other: int) -> bool:
    """The inbound request `other` still ran at start_us (with slack)."""
    return spans[other].start_us + spans[other].duration_us + CLOCK_SLACK_US >= start_us


def _latest_before(child: Span, candidates: list[int], spans: list[Span], fits: Callable[[int], bool]) -> Span | None:
    """The latest candidate (indexes into spans, in start order) that fits and started at or before the child;
    else (the two hosts' clocks disagree) the earliest that fits and started at most CLOCK_SLACK_US after it."""
    starts = [spans[index].start_us for index in candidates]
    position = bisect_right(starts, child.start_us)
    for index in reversed(candidates[max(0, position - SCAN_BACK):position]):
        if spans[index] is not child and fits(index):
            return spans[index]
    for index in candidates[position:position + SCAN_BACK]:
        if spans[index].start_us > child.start_us + CLOCK_SLACK_US:
            break
        if spans[index] is not child and fits(index):
            return spans[index]
    return None


def hop_trace(spans: Sequence[Span]) -> Trace:
    """One request's hops as a trace, under its trace id when every line that carries one names the same."""
    ids = {span.trace_id for span in spans if span.trace_id}
    return build_trace(spans, "access logs", ids.pop() if len(ids) == 1 else None)


def _epoch_us(line: AccessLine) -> int:
    stamp = line.time
    return int(stamp.timestamp()) * 1_000_000 + stamp.microsecond


def _number(value: object) -> float:
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return 0.0


def _trace_id(value: object) -> str | None:
    """A trace id as the access line writes it (`%TRACE_ID%`), lowercase; None for `-`, null or anything else."""
    text = str(value).lower() if isinstance(value, str) else ""
    if len(text) in (16, 32) and all(char in "0123456789abcdef" for char in text):
        return text.rjust(32, "0")
    return None


def _put(tags: dict[str, str], key: str, value: object) -> None:
    if value is not None and value != "" and value != "-":
        tags[key] = str(value)


# ---- the text view -----------------------------------------------------------------------------------------

Containers = Mapping[tuple[str, str], str]  # (host, proxy: name or Consul id) -> the app container on that host
HEADINGS = ("SERVICE", "DIRECTION", "WHERE", "REQUEST", "STATUS", "TOTAL", "SELF", "START")


def render_text(traces: Sequence[Trace], containers: Containers | None = None) -> str:
    """Each trace: its header line, then a table, one line per span in tree order; traces apart by a blank line."""
    return "\n\n".join(_trace_text(trace, containers or {}) for trace in traces) + ("\n" if traces else "")


def header(trace: Trace) -> str:
    """`trace <id> · request <id> · N spans · TOTAL ms · from the collector`."""
    count = len(trace.rows)
    ids = trace.request_ids
    return " · ".join((
        f"trace {trace.trace_id or '-'}",
        f"request {printable(', '.join(ids)) if ids else '-'}",
        f"{count} span{'' if count == 1 else 's'}",
        milliseconds(trace.duration_us),
        f"from the {trace.source}",
    ))


def _trace_text(trace: Trace, containers: Containers) -> str:
    table = [HEADINGS] + [_cells(row, containers) for row in trace.rows]
    widths = [max(len(cells[column]) for cells in table) for column in range(len(HEADINGS))]
    right = {4, 5, 6, 7}  # numbers line up on their right
    lines = [header(trace)]
    for cells in table:
        parts = [cell.rjust(width) if column in right else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(cells, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cells(row: Row, containers: Containers) -> tuple[str, ...]:
    span = row.span
    return (
        row.prefix + printable(span.service or "?"),
        printable(direction(span)),
        printable(where(span, containers)),
        printable(request_text(span)),
        printable(status_text(span)),
        milliseconds(span.duration_us),
        milliseconds(row.self_us),
        "+" + milliseconds(row.offset_us),
    )


def direction(span: Span) -> str:
    """`inbound` or `outbound` (mesh's tag; else from the span's kind), or the kind itself."""
    tagged = span.tags.get(DIRECTION_TAG)
    if tagged:
        return tagged
    return {"SERVER": "inbound", "CLIENT": "outbound"}.get(span.kind.upper(), span.kind.lower() or "?")


def where(span: Span, containers: Containers) -> str:
    """The inventory host, and the app container on a container host: `dock1/api-v2-1`."""
    host = span.tags.get(HOST_TAG)
    if not host:
        return "?"
    container = containers.get((host, span.tags.get(PROXY_TAG, "")))
    return f"{host}/{container}" if container else host


def request_text(span: Span) -> str:
    """`GET /path?query` (the path cut at PATH_WIDTH), or the span's name when it carries no HTTP tags."""
    method = span.tags.get(METHOD_TAG)
    url = span.tags.get(URL_TAG)
    if not method and not url:
        return span.name or "-"
    path = url or ""
    if url and "://" in url:
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if len(path) > PATH_WIDTH:
        path = path[:PATH_WIDTH - 1] + "…"
    return f"{method or '?'} {path}".strip()


def status_text(span: Span) -> str:
    status = span.tags.get(STATUS_TAG) or "-"
    flags = span.tags.get(FLAGS_TAG)
    return f"{status} {flags}" if flags and flags != "-" else status


def milliseconds(microseconds: int) -> str:
    return f"{microseconds / 1000:.1f} ms"


def printable(text: str) -> str:
    """text with control and other unprintable characters escaped (`\\x1b`): span names, paths and request ids
    come from whoever sent the request, and must not move a terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


# ---- the JSON view -----------------------------------------------------------------------------------------


def trace_json(trace: Trace) -> dict[str, Any]:
    """A trace: its ids, source, start and length, its spans (as the collector keeps them), and its tree flat, in
    the text view's order: each span's id, depth, effective parent, children, self time and offset."""
    return {
        "trace_id": trace.trace_id,
        "request_ids": list(trace.request_ids),
        "source": trace.source,
        "start_us": trace.start_us,
        "duration_us": trace.duration_us,
        "spans": [row.span.to_json() for row in trace.rows],
        "tree": [{"span_id": row.span.span_id, "parent_id": row.parent_id, "depth": row.depth,
                  "children": list(row.children), "self_us": row.self_us, "offset_us": row.offset_us}
                 for row in trace.rows],
    }


def render_json(traces: Sequence[Trace], searched: str, warnings: Sequence[str] = ()) -> dict[str, Any]:
    return {"searched": searched, "traces": [trace_json(trace) for trace in traces], "warnings": list(warnings)}
