"""A span as mesh keeps it (`Span`): what Envoy's Zipkin or OpenTelemetry tracer reported for one hop, with ids
in lowercase hex and times in epoch microseconds. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

REQUEST_ID_TAG = "guid:x-request-id"  # Envoy's tag of the request id (x-request-id)
SERVICE_TAG = "mesh.service"  # the custom tag mesh's Envoys add (mesh.config.tracing)


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 lowercase hex
    span_id: str  # 16 lowercase hex
    parent_id: str | None
    name: str  # Envoy's operation name
    kind: str  # "SERVER" | "CLIENT" | "INTERNAL" | "PRODUCER" | "CONSUMER" | "UNSPECIFIED"
    start_us: int  # epoch microseconds
    duration_us: int
    service: str | None  # tag mesh.service, else Zipkin's localEndpoint.serviceName / OTel's service.name
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def request_id(self) -> str | None:
        return self.tags.get(REQUEST_ID_TAG)

    def to_json(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "span_id": self.span_id, "parent_id": self.parent_id, "name": self.name,
                "kind": self.kind, "start_us": self.start_us, "duration_us": self.duration_us,
                "service": self.service, "tags": dict(sorted(self.tags.items()))}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Span:
        """The span of to_json's dict; KeyError, TypeError or ValueError when it is not one."""
        parent, service = data["parent_id"], data["service"]
        tags = data["tags"]
        if not isinstance(tags, Mapping):
            raise TypeError(f"tags: expected an object, got {tags!r}")
        return Span(trace_id=_hex(data["trace_id"], 32, "trace_id"), span_id=_hex(data["span_id"], 16, "span_id"),
                    parent_id=None if parent is None else _hex(parent, 16, "parent_id"), name=str(data["name"]),
                    kind=str(data["kind"]), start_us=int(data["start_us"]), duration_us=int(data["duration_us"]),
                    service=None if service is None else str(service),
                    tags=MappingProxyType({str(key): str(value) for key, value in tags.items()}))


def _hex(value: Any, length: int, what: str) -> str:
    if not isinstance(value, str) or len(value) != length or value.strip("0123456789abcdef"):
        raise ValueError(f"{what}: expected {length} lowercase hex digits, got {value!r}")
    return value
