"""Access lines as mesh's Envoys write them (design 3.1): parsing a log line, the source service from the
authoritative SPIFFE id, filters, merging by time (also while following), and the readable form.

Pure: text in, lines out; it must not reach a host (logs.py does).
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

MARKER_KEY, MARKER = "mesh", "access"
_SERVICE_ID = re.compile(r"spiffe://[^/]+/svc/([^/]+)")
_AGO = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True)
class AccessLine:
    """One access line: its start time (UTC) and every field Envoy wrote, `source_service` filled in."""

    time: datetime
    fields: Mapping[str, Any]

    def get(self, key: str) -> Any:
        return self.fields.get(key)

    @property
    def source_service(self) -> str | None:
        return self.fields.get("source_service")

    @property
    def destination_service(self) -> str | None:
        return self.fields.get("destination_service")

    def sort_key(self) -> tuple[datetime, str]:
        return self.time, str(self.fields.get("proxy") or "")


def service_of(identity: object) -> str | None:
    """`web` from `spiffe://<trust domain>/svc/web`; None from anything else (no peer, mesh's own checker)."""
    match = _SERVICE_ID.fullmatch(identity) if isinstance(identity, str) else None
    return match.group(1) if match else None


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time as UTC (`2026-12-06T14:30:01.123456Z`); a time without a zone is taken as UTC."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_access_line(text: str) -> AccessLine | None:
    """The access line a log line holds, or None: only JSON objects with `"mesh": "access"` and a time are.
    `source_service` is always the one the peer's certificate names (`source_identity`), never the header's."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        fields = json.loads(text)
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get(MARKER_KEY) != MARKER:
        return None
    when = parse_time(fields.get("time"))
    if when is None:
        return None
    fields["source_service"] = service_of(fields.get("source_identity"))
    return AccessLine(when, fields)


def parse_access_lines(text: str) -> list[AccessLine]:
    return [line for line in map(parse_access_line, text.splitlines()) if line is not None]


def parse_since(text: str, now: datetime) -> datetime:
    """`30s`, `5m`, `2h`, `1d` before now, or an ISO time (UTC when it names no zone). ValueError otherwise."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        try:
            return now - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before the year 1") from None
    when = parse_time(text.strip())
    if when is None:
        raise ValueError(f"{text!r} is neither a duration (30s, 5m, 2h, 1d) nor an ISO time (2026-12-06T14:00:00Z)")
    return when


@dataclass(frozen=True)
class LineFilter:
    """Which lines `mesh logs` prints: started at or after `since`, and naming `service` as source or
    destination when one is given."""

    since: datetime | None = None
    service: str | None = None

    def __call__(self, line: AccessLine) -> bool:
        if self.since is not None and line.time < self.since:
            return False
        return self.service is None or self.service in (line.source_service, line.destination_service)


def merge_by_time(*sources: Iterable[AccessLine]) -> list[AccessLine]:
    """Every line of every source in start time order (a proxy writes a line when its request ends, so even one
    source is not in start order)."""
    return sorted((line for source in sources for line in source), key=AccessLine.sort_key)


class ReorderBuffer:
    """Holds followed lines `window` seconds after they arrived, so that lines from several proxies (and a
    proxy's own, written when each request ends) come out in start time order: when a line is due, every line
    held that started before it leaves with it. Arrival times only: hosts' clocks may differ from ours."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._held: list[tuple[tuple[datetime, str], int, float, AccessLine]] = []
        self._count = 0

    def add(self, line: AccessLine, arrived: float) -> None:
        self._count += 1
        heapq.heappush(self._held, (line.sort_key(), self._count, arrived, line))

    def ready(self, clock: float) -> list[AccessLine]:
        """The lines due at `clock` (the clock `arrived` was read from), in time order."""
        due = [key for key, _, arrived, _ in self._held if arrived <= clock - self.window]
        if not due:
            return []
        cutoff = max(due)
        out = []
        while self._held and self._held[0][0] <= cutoff:
            out.append(heapq.heappop(self._held)[3])
        return out

    def drain(self) -> list[AccessLine]:
        out = [entry[3] for entry in sorted(self._held)]
        self._held = []
        return out


def line_json(line: AccessLine) -> str:
    return json.dumps(dict(line.fields), sort_keys=True, ensure_ascii=False)


def _service(name: object, version: object) -> str:
    text = str(name) if name else "?"
    return f"{text}({version})" if version else text


def readable(line: AccessLine) -> str:
    """One line for a person: time, reporting proxy, direction, who called whom, then what happened."""
    get = line.get
    stamp = line.time.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    who = (f"{_service(get('source_service'), get('source_version'))} -> "
           f"{_service(get('destination_service'), get('destination_version'))}")
    parts = [stamp, str(get("proxy") or "?"), str(get("direction") or "?"), who]
    if get("protocol") == "tcp" or get("method") is None:
        parts.append(f"tcp rx={get('bytes_received')} tx={get('bytes_sent')}")
    else:
        parts.append(f"{get('method')} {get('authority') or ''}{get('path') or ''} {get('status')}")
    parts.append(f"{get('duration_ms')}ms")
    flags = get("response_flags")
    if flags and flags != "-":
        parts.append(f"flags={flags}")
    if get("upstream_host"):
        parts.append(f"upstream={get('upstream_host')}")
    if get("request_id"):
        parts.append(f"id={get('request_id')}")
    if get("mtls") is False:
        parts.append("plaintext")
    return " ".join(parts)
