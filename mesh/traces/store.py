"""TraceStore: the controller's ring of recent traces, fed by the span receiver, read by the traces API.

Bounded three ways: at most `max_traces` traces (the oldest trace, by its first span's arrival, goes first), at
most `max_spans_per_trace` spans in one trace (later ones are dropped and counted), and at most `max_spans` spans
in all (oldest traces go first). A span reported twice (same trace, span id and kind) is kept once. Thread-safe:
one lock, held only for dictionary work.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.traces.model import Span

DEFAULT_MAX_TRACES = 2000
DEFAULT_MAX_SPANS_PER_TRACE = 1000
DEFAULT_MAX_SPANS = 200_000


@dataclass(frozen=True)
class StoreCounts:
    traces: int
    spans: int
    received: int  # spans taken in, ever
    duplicates: int  # spans already held, ignored
    dropped: int  # spans refused because their trace was full
    evicted: int  # traces pushed out of the ring


class _Trace:
    __slots__ = ("spans", "start_us")

    def __init__(self) -> None:
        self.spans: dict[tuple[str, str], Span] = {}  # (span id, kind) -> span, in arrival order
        self.start_us = 0


class TraceStore:
    def __init__(self, max_traces: int = DEFAULT_MAX_TRACES, max_spans_per_trace: int = DEFAULT_MAX_SPANS_PER_TRACE,
                 max_spans: int = DEFAULT_MAX_SPANS) -> None:
        if max_traces < 1 or max_spans_per_trace < 1 or max_spans < 1:
            raise ValueError("a trace store holds at least one trace of one span")
        self.max_traces, self.max_spans_per_trace, self.max_spans = max_traces, max_spans_per_trace, max_spans
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, _Trace] = OrderedDict()  # trace id -> spans, oldest first
        self._requests: dict[str, set[str]] = {}  # request id -> the trace ids holding it
        self._spans = 0
        self._received = self._duplicates = self._dropped = self._evicted = 0

    def add(self, spans: Iterable[Span]) -> int:
        """Keep `spans`; returns how many were new."""
        added = 0
        with self._lock:
            for span in spans:
                self._received += 1
                trace = self._traces.get(span.trace_id)
                if trace is None:
                    trace = self._traces[span.trace_id] = _Trace()
                    trace.start_us = span.start_us
                key = (span.span_id, span.kind)
                if key in trace.spans:
                    self._duplicates += 1
                    continue
                if len(trace.spans) >= self.max_spans_per_trace:
                    self._dropped += 1
                    continue
                trace.spans[key] = span
                trace.start_us = min(trace.start_us, span.start_us) if trace.start_us else span.start_us
                self._spans += 1
                added += 1
                if span.request_id:
                    self._requests.setdefault(span.request_id, set()).add(span.trace_id)
                self._evict(keep=span.trace_id)
        return added

    def _evict(self, keep: str) -> None:
        while len(self._traces) > self.max_traces or self._spans > self.max_spans:
            oldest = next(iter(self._traces))
            if oldest == keep and len(self._traces) == 1:
                return  # one trace alone: max_spans_per_trace bounds it
            if oldest == keep:
                self._traces.move_to_end(keep)
                continue
            trace = self._traces.pop(oldest)
            self._spans -= len(trace.spans)
            self._evicted += 1
            for span in trace.spans.values():
                holders = self._requests.get(span.request_id or "")
                if holders is not None:
                    holders.discard(oldest)
                    if not holders:
                        del self._requests[span.request_id or ""]

    def trace(self, trace_id: str) -> tuple[Span, ...]:
        """The trace's spans by start time (empty when not held)."""
        with self._lock:
            trace = self._traces.get(trace_id)
            return _ordered(trace.spans.values()) if trace else ()

    def by_request(self, request_id: str) -> tuple[Span, ...]:
        """Every span of every trace holding a span tagged with that request id, by start time."""
        with self._lock:
            found = [span for trace_id in sorted(self._requests.get(request_id, ()))
                     for span in self._traces[trace_id].spans.values()]
        return _ordered(found)

    def last(self, n: int, service: str | None = None) -> list[tuple[Span, ...]]:
        """The n traces that started last (newest first), only those with a span of `service` when given."""
        with self._lock:
            held = [(trace.start_us, trace_id, tuple(trace.spans.values()))
                    for trace_id, trace in self._traces.items()
                    if service is None or any(span.service == service for span in trace.spans.values())]
        held.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [_ordered(spans) for _start, _trace_id, spans in held[:max(0, n)]]

    def counts(self) -> StoreCounts:
        with self._lock:
            return StoreCounts(len(self._traces), self._spans, self._received, self._duplicates, self._dropped,
                               self._evicted)


def _ordered(spans: Iterable[Span]) -> tuple[Span, ...]:
    return tuple(sorted(spans, key=lambda span: (span.start_us, span.kind != "CLIENT", span.span_id)))
