"""Spans as mesh's Envoys report them and access lines of the same requests, for the unit tests of `mesh trace`
(mesh.traces.view, sources and cli). Nothing here is a test."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

from mesh.traces.model import Span

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
REQUEST = "5c0a1e6e-8a3d-4c52-9d1f-7e2b0c4d9a11"
T0 = 1_796_000_000_000_000  # epoch microseconds (2026-11-30)


def span(span_id: str, parent: str | None, service: str, direction: str, host: str, start_ms: float,
         duration_ms: float, trace_id: str = TRACE, request_id: str | None = REQUEST, path: str = "/",
         status: str = "200", proxy: str | None = None, **tags: str) -> Span:
    """A span of Envoy's Zipkin tracer with mesh's custom tags, `start_ms` after T0."""
    all_tags = {"mesh.service": service, "mesh.direction": direction, "mesh.host": host,
                "mesh.proxy": proxy or f"{service}-{host}", "http.method": "GET",
                "http.url": f"http://{service}{path}", "http.status_code": status, "component": "proxy", **tags}
    if request_id is not None:
        all_tags["guid:x-request-id"] = request_id
    return Span(trace_id=trace_id, span_id=span_id.rjust(16, "0"), parent_id=parent.rjust(16, "0") if parent else None,
                name=f"{service}:{path}", kind="SERVER" if direction == "inbound" else "CLIENT",
                start_us=T0 + int(start_ms * 1000), duration_us=int(duration_ms * 1000), service=service,
                tags=MappingProxyType(all_tags))


def web_api_pricing() -> list[Span]:
    """web (vm1) -> api (dock1's container), which calls pricing (vm3) twice, the second time in parallel with a
    call to api's cache (vm2); the last pricing call answered 503 with Envoy's UF flag."""
    return [
        span("a1", None, "web", "outbound", "vm1", 0.0, 24.6, mesh_upstream="api"),
        span("b1", "a1", "api", "inbound", "dock1", 0.4, 23.9, proxy="api-dock1-api-v2-1"),
        span("b2", "b1", "api", "outbound", "dock1", 1.2, 6.1, path="/price?sku=7", proxy="api-dock1-api-v2-1"),
        span("c1", "b2", "pricing", "inbound", "vm3", 1.5, 5.5, path="/price?sku=7"),
        span("b3", "b1", "api", "outbound", "dock1", 8.0, 14.0, path="/price?sku=8", status="503",
             proxy="api-dock1-api-v2-1", response_flags="UF"),
        span("b4", "b1", "api", "outbound", "dock1", 9.0, 3.0, path="/cache", proxy="api-dock1-api-v2-1"),
        span("d1", "b4", "cache", "inbound", "vm2", 9.3, 2.4, path="/cache"),
    ]


CONTAINERS = MappingProxyType({("dock1", "api-dock1-api-v2-1"): "api-v2-1"})


def line(time: str, proxy: str, direction: str, source: str, destination: str, duration_ms: int,
         request_id: str | None = REQUEST, **fields: Any) -> str:
    """An HTTP access line as mesh's Envoys write it (mesh.config.telemetry), as JSON text."""
    data: dict[str, Any] = {
        "mesh": "access", "time": time, "proxy": proxy, "direction": direction, "protocol": "http",
        "source_identity": f"spiffe://lab.mesh/svc/{source}", "destination_identity": f"spiffe://lab.mesh/svc/{destination}",
        "source_service": source, "destination_service": destination, "method": "GET", "path": "/",
        "authority": destination, "status": 200, "duration_ms": duration_ms, "request_id": request_id,
        "trace_id": None, "response_flags": "-", "mtls": True,
    }
    if direction == "outbound":
        data["source_instance"] = proxy
    data.update(fields)
    return json.dumps(data)


def web_api_db_lines(request_id: str = REQUEST, second: str = "01") -> list[str]:
    """One request through web (vm1) and api (vm2), whose call to db is TCP (no request id), in the order the
    journals hold them (each line written when its request ended)."""
    t = f"2026-12-07T00:30:{second}"
    return [
        line(f"{t}.004000Z", "api-vm2-9090", "inbound", "web", "api", 9, request_id,
             source_instance="web-vm1-8080", destination_instance="api-vm2-9090"),
        json.dumps({"mesh": "access", "time": f"{t}.005000Z", "proxy": "api-vm2-9090", "direction": "outbound",
                    "protocol": "tcp", "source_service": "api", "destination_service": "db", "duration_ms": 2}),
        line(f"{t}.002000Z", "web-vm1-8080", "outbound", "web", "api", 12, request_id,
             destination_instance="api-vm2-9090"),
    ]
