"""A small mesh with edges (web -> api -> db, api on a VM and in a container) and Envoy-like Prometheus text,
for the unit tests of mesh.telemetry. Nothing here is a test."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Upstream, Workload

TD = "lab.mesh"
BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


def telemetry_mesh(api_version: str = "v2") -> Mesh:
    """ctl1 (controller); vm1: web -> api; vm2: api v1 -> db, db (tcp); dock1: api in a container."""
    hosts = (
        ManagedHost("ctl1", "vm", Connection("10.77.0.3"), is_controller=True),
        ManagedHost("vm1", "vm", Connection("10.77.0.11"), (
            Workload("vm1", 0, "web", 8080, TD, upstreams=(Upstream("api", 19101),), metrics_port=20000),)),
        ManagedHost("vm2", "vm", Connection("10.77.0.12"), (
            Workload("vm2", 0, "api", 9090, TD, upstreams=(Upstream("db", 19102),), metrics_port=20000),
            Workload("vm2", 1, "db", 5432, TD, protocol="tcp", proxy_port=21001, metrics_port=20001))),
        ManagedHost("dock1", "container_host", Connection("fd00::20"), (
            Workload("dock1", 0, "api", 9090, TD, version=api_version, container="api-v2-1",
                     upstreams=(Upstream("db", 19102),), metrics_port=20000),)),
    )
    return Mesh(MeshSettings(trust_domain=TD), hosts)


Labels = Mapping[str, str]


class PromText:
    """Envoy's /stats/prometheus of one proxy: counters and histograms (cumulative buckets, ms)."""

    def __init__(self) -> None:
        self.counters: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
        self.histograms: dict[str, list[tuple[Labels, dict[float, float]]]] = defaultdict(list)

    def counter(self, name: str, labels: Labels, value: float) -> PromText:
        self.counters[name].append((labels, value))
        return self

    def histogram(self, name: str, labels: Labels, values: list[float]) -> PromText:
        """A histogram of these observations."""
        buckets = {bound: float(sum(1 for v in values if v <= bound)) for bound in BUCKETS}
        buckets[float("inf")] = float(len(values))
        self.histograms[name].append((labels, buckets))
        return self

    def text(self) -> str:
        lines = []
        for name, series in self.counters.items():
            lines.append(f"# TYPE {name} counter")
            lines += [f"{name}{_labels(labels)} {value:g}" for labels, value in series]
        for name, hist in self.histograms.items():
            lines.append(f"# TYPE {name} histogram")
            for labels, buckets in hist:
                for bound, count in buckets.items():
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {count:g}")
                lines.append(f"{name}_sum{_labels(labels)} 0")
                lines.append(f"{name}_count{_labels(labels)} {buckets[float('inf')]:g}")
        return "\n".join(lines) + "\n"


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


def access(time: str, proxy: str = "web-vm1-8080", **fields: Any) -> str:
    """An access line as Envoy writes it (design 3.1), with the fields given."""
    line: dict[str, Any] = {"mesh": "access", "time": time, "proxy": proxy, "direction": "outbound",
                            "protocol": "http", "source_identity": f"spiffe://{TD}/svc/web",
                            "destination_identity": f"spiffe://{TD}/svc/api", "source_service": "web",
                            "destination_service": "api", "method": "GET", "path": "/", "status": 200,
                            "duration_ms": 3, "bytes_received": 0, "bytes_sent": 120, "mtls": True}
    line.update(fields)
    return json.dumps(line)
