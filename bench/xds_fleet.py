"""The controller side of bench/convergence `--delivery xds`: a synthetic fleet (N hosts, each running `web` of
mesh.testing.loopback's two-service mesh with its own node id; `api` with M instances) and a process serving it
with mesh's real ADS server, so its CPU and memory are measured apart from the load generator.

    python bench/xds_fleet.py serve --dir DIR --port PORT --proxies N --endpoints M [--trust-domain bench.mesh]
                                    [--server-tls mesh|static]

DIR holds what the driver made (bench/convergence_xds.py): `bundle.pem` (the mesh CA's trust bundle),
`server.pem` (the controller's chain) and `server-key.pem` (0600). The process prints one JSON line per event on
stdout and reads one command per line on stdin:

- at start, `{"event": "ready", ...}` once the fleet's snapshot and resources are built and the server listens;
- `change K`: a Consul change (instance K-1 mod M of `api` no longer up; K = 0: every instance up), done as the
  controller does it: build_snapshot over the spec with the new endpoints (from the previous build, with the EDS
  render memo), then the controller's XdsFeed.offer (ads_resources for every proxy whose snapshot moved,
  XdsServer.update); answers `{"event": "applied", "change": K, "t0": ..., ...}` (t0: time.monotonic() when the
  line was read; same clock as the generator's) and writes every node's expected versions to DIR/versions-K.json;
- `status`: `{"event": "status", "nodes": {node id: that node's StreamStatus}}`;
- `quit` (or end of input): stops the server and exits.

Everything is real mesh code but the inputs: the spec is synthetic (one proxy per host, the same plan files for
every host, as an inventory of N hosts running one service renders them) and Consul is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SERVICE = "web"
UPSTREAM = "api"


def node_id(index: int) -> str:
    """The node id (Consul service ID) of host i's proxy, as mesh names them: <service>-<host>-<port>."""
    return f"{SERVICE}-h{index:04d}-9080"


def fleet_spec(proxies: int, trust_domain: str) -> Any:
    """A ControllerSpec of `proxies` hosts, each with web's proxy as mesh renders it (delivery xds, own node id)."""
    from mesh.config import compute_proxy_config, paths
    from mesh.controller.spec import (
        ControllerSpec,
        EndpointSource,
        HostSpec,
        IdentitySpec,
        ProxySpec,
        SpecFile,
    )
    from mesh.render import render_proxy_files
    from mesh.testing.loopback import two_service_mesh

    loop = two_service_mesh(api_app_port=9090, trust_domain=trust_domain)
    config = compute_proxy_config(loop.mesh, loop.web)
    files = render_proxy_files(config)
    xds = f"{files.proxy_dir}/{paths.XDS_DIR_NAME}"
    endpoints = {f"{xds}/eds.{listener.cluster}.yaml": EndpointSource(listener.service)
                 for listener in config.outbound}
    planned = tuple(SpecFile(f.path, f.kind, f.content) for f in files.files)  # type: ignore[arg-type]
    spiffe = f"spiffe://{trust_domain}/{SERVICE}"
    hosts = []
    for index in range(proxies):
        proxy = ProxySpec(files.proxy, SERVICE, files.proxy_dir, files.bootstrap_sha256, planned, endpoints,
                          node_id=node_id(index), delivery="xds")
        hosts.append(HostSpec(f"h{index:04d}", f"127.3.{index // 250}.{index % 250 + 1}", 22, (),
                              (IdentitySpec(files.proxy, "vm", spiffe, node_id(index)),), (proxy,)))
    return ControllerSpec(mesh_id="bench", trust_domain=trust_domain, plan_digest="bench",
                          consul_url="http://127.0.0.1:1", consul_token_file=None, consul_ca_file=None,
                          cert_ttl_s=86400, hosts=tuple(hosts))


def known_endpoints(count: int, change: int) -> Any:
    """Consul's answer for `api` after change K: `count` instances registered, the one at K mod count (K > 0) not up."""
    from mesh.controller.endpoints import Endpoint, ServiceEndpoints

    registered = tuple(Endpoint(f"10.20.{i // 250}.{i % 250 + 1}", 9090, service=UPSTREAM, instance=f"{UPSTREAM}-h{i}",
                                host=f"a{i:04d}") for i in range(count))
    drained = (change - 1) % count if change > 0 else None
    up = tuple(endpoint for index, endpoint in enumerate(registered) if index != drained)
    return {UPSTREAM: ServiceEndpoints(UPSTREAM, registered, up)}


@dataclass(frozen=True)
class StaticCert:
    """A CertSource (mesh.traces.serving) serving one certificate made by the bench."""

    chain_pem: bytes
    key_pem: bytes

    def current(self) -> Any:
        from mesh.traces.serving import ServingCert

        now = datetime.now(UTC)
        return ServingCert(self.chain_pem, self.key_pem, "bench", now - timedelta(minutes=5), now + timedelta(days=1))


def _static_credentials(cert: StaticCert, bundle_path: str) -> Any:
    """`--server-tls static`: the server's mTLS replaced by the bench's own static credentials (no renewal, no
    bundle re-read): a diagnostic (mesh's server used grpc.dynamic_ssl_server_credentials, which crashed with
    hundreds of handshakes at once, grpcio 1.85.4); the bench's default runs mesh's server as it is."""
    import grpc

    return grpc.ssl_server_credentials([(cert.key_pem, cert.chain_pem)], Path(bundle_path).read_bytes(),
                                       require_client_auth=True)


def usage() -> dict[str, float]:
    """This process's CPU seconds (user + system) and RSS (KiB)."""
    times = os.times()
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"cpu_s": times.user + times.system, "rss_kb": rss}


class FleetServer:
    """The fleet's snapshot served by the controller's own feed (mesh.controller.xds_feed.XdsFeed) over a real
    XdsServer; every file set accepted (the controller validates once per route set, never per endpoint change)."""

    def __init__(self, folder: Path, port: int, proxies: int, endpoints: int, trust_domain: str,
                 static_tls: bool = False, max_connection_age_s: float | None = None) -> None:
        from mesh.controller.xds_feed import XdsFeed
        from mesh.xds.server import XdsServer

        self.folder, self.endpoints = folder, endpoints
        self.spec = fleet_spec(proxies, trust_domain)
        cert = StaticCert((folder / "server.pem").read_bytes(), (folder / "server-key.pem").read_bytes())
        bundle = str(folder / "bundle.pem")

        def make(spec: Any) -> Any:
            server = XdsServer(port, cert, bundle, spec.trust_domain, host="127.0.0.1")
            if max_connection_age_s is not None:  # streams closed (and reconnected) sooner than mesh's 300 s
                server.max_connection_age_s = max_connection_age_s
                server.max_connection_age_grace_s = min(server.max_connection_age_grace_s, max_connection_age_s)
            if static_tls:
                server._credentials = lambda: _static_credentials(cert, bundle)  # type: ignore[method-assign]
            return server
        self.feed = XdsFeed(make, bundle)
        self.built: Any = None  # the previous build (mesh.controller.snapshot.Built), as the controller keeps it
        self.renders: Any = None  # the controller's EDS render memo (mesh.controller.endpoints.EdsRenders)

    def start(self) -> None:
        self.feed.keep(self.spec)

    def stop(self) -> None:
        self.feed.stop()

    def apply(self, change: int, t0: float) -> dict[str, Any]:
        """Change K as the controller's loop does it: the snapshot with Consul's new answer, then the feed's offer
        (ads_resources for every proxy whose snapshot moved, then XdsServer.update)."""
        from mesh.controller.endpoints import EdsRenders
        from mesh.controller.snapshot import Built, build_snapshot

        if self.renders is None:
            self.renders = EdsRenders()
        known = known_endpoints(self.endpoints, change)
        snapshot = build_snapshot(self.spec, known, previous=self.built, renders=self.renders)  # as the daemon does
        self.built = Built(snapshot, self.spec, known, None, None)
        built = time.monotonic()
        self.feed.offer(self.spec, snapshot, lambda _snapshot: None)
        updated = time.monotonic()
        versions = {node: dict(resources.versions) for node, resources in self.feed.served.items()}
        path = self.folder / f"versions-{change}.json"
        path.write_text(json.dumps(versions))
        return {"event": "applied", "change": change, "t0": t0, "updated": updated, "versions": str(path),
                "snapshot_s": built - t0, "offer_s": updated - built, **usage()}


_events = sys.stdout  # the driver's channel; serve() moves every other print (the server's logs) to stderr


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), file=_events, flush=True)


def serve(args: argparse.Namespace) -> None:
    global _events
    _events = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # the modules' fixed cost is not the fleet's: imported before the first measure
    import mesh.controller.snapshot
    import mesh.controller.xds_feed
    import mesh.render
    import mesh.xds.resources
    import mesh.xds.server  # noqa: F401
    from mesh.testing.loopback import two_service_mesh  # noqa: F401

    before = usage()
    fleet = FleetServer(args.dir, args.port, args.proxies, args.endpoints, args.trust_domain,
                        args.server_tls == "static")
    fleet.start()
    first = fleet.apply(0, time.monotonic())
    time.sleep(0.5)  # the server serves an update after its debounce: before that a node is unknown (NOT_FOUND)
    emit({**first, "event": "ready", "before_fleet": before})
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "change":
                emit(fleet.apply(int(words[1]), time.monotonic()))
            elif words[0] == "status":
                emit({"event": "status", "nodes": _jsonable(fleet.feed.status()), **usage()})
            elif words[0] == "usage":
                emit({"event": "usage", **usage()})
            elif words[0] == "quit":
                break
            else:
                emit({"event": "error", "message": f"unknown command {words[0]!r}"})
    finally:
        fleet.stop()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _jsonable(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the bench's ADS server process (bench/convergence --delivery xds)")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--proxies", type=int, required=True)
    parser.add_argument("--endpoints", type=int, required=True)
    parser.add_argument("--trust-domain", default="bench.mesh")
    parser.add_argument("--server-tls", default="mesh", choices=["mesh", "static"])
    serve(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
