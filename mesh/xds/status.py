"""What a controller publishes of its ADS streams, and the merge `mesh status` does of every controller's
publication. Pure: the caller writes and reads the key-value store and gives the clock.

A publication (JSON):

    {"controller": "ctl1", "published_at": 1765080000.0,
     "streams": {"api-vm2-9090": {"peer": "ipv4:10.0.0.12:40312", "connected_since": 1765079000.0,
                                  "types": [{"type": "CDS", "state": "synced", "sent": "9f..", "acked": "9f..",
                                             "error": null, "responses": 1}, ...]}}}

Per type: `synced` (the proxy ACKed the current version), `nacked` (it refused the current version: `error` is
Envoy's message), `stale` (otherwise: in flight, or the proxy still runs an older version). A proxy streams from one
controller at a time, but a controller may still hold a dead stream for a while: the merge keeps, per node, the
stream connected last; a publication older than PUBLICATION_MAX_AGE_S (its controller is gone) is ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PUBLICATION_MAX_AGE_S = 30.0
STATES = ("synced", "stale", "nacked")


@dataclass(frozen=True)
class TypeStatus:
    """One resource type of one stream (istioctl proxy-status's columns)."""

    type: str  # LDS, CDS, EDS, RDS, SDS, ECDS
    state: str  # synced | stale | nacked
    sent: str | None
    acked: str | None
    error: str | None
    responses: int = 0  # responses sent for this type on this stream

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "state": self.state, "sent": self.sent, "acked": self.acked, "error": self.error,
                "responses": self.responses}


@dataclass(frozen=True)
class StreamStatus:
    """One node's stream on one controller."""

    node_id: str
    peer: str
    connected_since: float  # seconds since the epoch
    types: tuple[TypeStatus, ...]
    controller: str = ""  # set by the merge: whose stream this is

    @property
    def state(self) -> str:
        """The worst of its types: nacked, then stale, then synced (stale with no type yet)."""
        states = {item.state for item in self.types}
        return "nacked" if "nacked" in states else "stale" if "stale" in states or not states else "synced"

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "connected_since": self.connected_since,
                "types": [item.to_json() for item in self.types]}


def publication(controller: str, streams: Mapping[str, StreamStatus], now: float) -> dict[str, Any]:
    """What `controller` publishes at `now` (seconds since the epoch)."""
    return {"controller": controller, "published_at": now,
            "streams": {node: stream.to_json() for node, stream in sorted(streams.items())}}


def merged(publications: Iterable[Any], now: float) -> dict[str, StreamStatus]:
    """node id -> its stream, from every controller's publication (parsed JSON; anything malformed is skipped):
    per node the stream connected last (then the newer publication); publications older than
    PUBLICATION_MAX_AGE_S are ignored."""
    chosen: dict[str, tuple[float, float, StreamStatus]] = {}
    for raw in publications:
        parsed = _publication(raw)
        if parsed is None:
            continue
        controller, published_at, streams = parsed
        if now - published_at > PUBLICATION_MAX_AGE_S:
            continue
        for stream in streams:
            key = (stream.connected_since, published_at)
            held = chosen.get(stream.node_id)
            if held is None or key > held[:2]:
                chosen[stream.node_id] = (*key, StreamStatus(stream.node_id, stream.peer, stream.connected_since,
                                                             stream.types, controller))
    return {node: entry[2] for node, entry in sorted(chosen.items())}


def parse_publication(text: str | bytes) -> Any:
    """The JSON of a stored publication, or None when it is not JSON (merged skips it)."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _publication(raw: Any) -> tuple[str, float, list[StreamStatus]] | None:
    if not isinstance(raw, dict):
        return None
    controller, published_at, streams = _text(raw.get("controller")), _number(raw.get("published_at")), \
        raw.get("streams")
    if controller is None or published_at is None or not isinstance(streams, dict):
        return None
    parsed = []
    for node, body in streams.items():
        if not isinstance(node, str) or not isinstance(body, dict):
            continue
        since, types = _number(body.get("connected_since")), body.get("types")
        if since is None or not isinstance(types, list):
            continue
        shown = []
        for item in types:
            if not isinstance(item, dict) or _text(item.get("type")) is None or item.get("state") not in STATES:
                continue
            responses = item.get("responses")
            shown.append(TypeStatus(item["type"], item["state"], _text(item.get("sent")), _text(item.get("acked")),
                                    _text(item.get("error")),
                                    responses if isinstance(responses, int) and not isinstance(responses, bool)
                                    else 0))
        parsed.append(StreamStatus(node, _text(body.get("peer")) or "", since, tuple(shown)))
    return controller, published_at, parsed
