"""The controller's Prometheus metrics, in a registry of its own (two controllers in one test never share one),
served on the controller's loopback only. It owns the metric names; it must not decide anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PUSH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LISTEN_ADDRESS = "127.0.0.1"


class ControllerMetrics:
    """mesh_controller_* metrics; `serve(port)` starts the HTTP endpoint (127.0.0.1 only)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pushes = Counter("mesh_controller_pushes", "Pushes to hosts by result (ok, refused, error)",
                              ["result"], registry=self.registry)
        self.push_seconds = Histogram("mesh_controller_push_seconds", "Duration of one push to one host",
                                      buckets=PUSH_BUCKETS, registry=self.registry)
        self.hosts_behind = Gauge("mesh_controller_hosts_behind",
                                  "Hosts whose files are not the controller's snapshot yet", registry=self.registry)
        self.consul_staleness = Gauge("mesh_controller_consul_staleness_seconds",
                                      "Seconds since Consul last answered (0 while it answers)",
                                      registry=self.registry)
        self.certificate_remaining = Gauge("mesh_controller_certificate_remaining_seconds",
                                           "Seconds before each identity's certificate expires",
                                           ["host", "identity"], registry=self.registry)
        self.leader = Gauge("mesh_controller_leader", "1 while this controller holds the lock",
                            registry=self.registry)
        self.server: Any = None

    def serve(self, port: int) -> None:
        if port > 0:
            self.server, _thread = start_http_server(port, addr=LISTEN_ADDRESS, registry=self.registry)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def push_done(self, result: str, seconds: float) -> None:
        self.pushes.labels(result=result).inc()
        self.push_seconds.observe(seconds)

    def certificates(self, remaining: Mapping[tuple[str, str], float]) -> None:
        """Set every (host, identity)'s remaining seconds; identities no longer listed are dropped."""
        self.certificate_remaining.clear()
        for (host, identity), seconds in remaining.items():
            self.certificate_remaining.labels(host=host, identity=identity).set(seconds)

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample's value (tests)."""
        return self.registry.get_sample_value(name, dict(labels or {}))
