"""What a controller serves over ADS: every xds proxy's resources from the controller's snapshot, once the file set
they come from passed the controller's own Envoy validation (the pusher's, shared), with the trust bundle the
controller holds. Every controller serves (leader or standby); the server runs only while the spec has an xds
proxy.

It owns the ADS server's lifecycle in the controller and the choice of what is served; it must not push files,
talk to Consul or compute resources (mesh.xds.resources does).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from mesh.config.xds import XDS_PORT
from mesh.controller.snapshot import ProxyKey, ProxySnapshot, Snapshot
from mesh.controller.spec import ControllerSpec

Refusal = Callable[[ProxySnapshot], "str | None"]  # None: Envoy accepts the snapshot's file set
ServerFactory = Callable[[ControllerSpec], Any]  # -> an object with start(), stop(), update(), status()


def xds_proxies(spec: ControllerSpec) -> dict[ProxyKey, str]:
    """(host, proxy) -> node id of every proxy on `mesh_delivery: xds`."""
    return {(host.name, proxy.name): proxy.node_id for host in spec.hosts for proxy in host.proxies
            if proxy.delivery == "xds" and proxy.node_id}


class XdsFeed:
    """The controller's ADS server and what it serves. Used by the controller's loop thread only; the server
    runs its own thread."""

    def __init__(self, make_server: ServerFactory, bundle_path: str) -> None:
        self.make_server = make_server
        self.bundle_path = bundle_path
        self.server: Any = None
        self.server_of: tuple[str, int] | None = None  # (trust domain, cert ttl) the running server was made for
        self.served: dict[str, Any] = {}  # node id -> ProxyResources
        self.served_of: dict[str, tuple[str, str]] = {}  # node id -> (snapshot version, bundle digest)
        self.refused: dict[str, str] = {}  # node id -> the snapshot version refused (logged once)
        self.bundle: tuple[tuple[float, int], str] | None = None
        self.log = structlog.get_logger()

    @property
    def serving(self) -> bool:
        return self.server is not None

    def keep(self, spec: ControllerSpec) -> None:
        """The server the spec asks for: running while some proxy is on xds, remade when the trust domain or the
        certificate lifetime changes."""
        wanted = (spec.trust_domain, spec.cert_ttl_s) if xds_proxies(spec) else None
        if wanted == self.server_of:
            return
        self.stop()
        self.server_of = wanted
        if wanted is not None:
            self.server = self.make_server(spec)
            self.server.start()
            self.log.info("xds_serving", port=XDS_PORT, proxies=len(xds_proxies(spec)))

    def offer(self, spec: ControllerSpec, snapshot: Snapshot, refusal: Refusal) -> None:
        """Serve each xds proxy its snapshot when Envoy accepts its file set; a refused one keeps what it had."""
        if self.server is None:
            return
        from mesh.xds.resources import ads_resources  # protobuf classes: loaded only where ADS is served

        bundle = self._bundle()
        if bundle is None:
            return
        bundle_digest = hashlib.sha256(bundle.encode()).hexdigest()
        wanted_nodes = xds_proxies(spec)
        for key, node_id in wanted_nodes.items():
            wanted = snapshot.get(key)
            if wanted is None:
                continue
            stamp = (wanted.version, bundle_digest)
            if self.served_of.get(node_id) == stamp:
                continue
            reason = refusal(wanted)
            if reason is not None:
                if self.refused.get(node_id) != wanted.version:
                    self.refused[node_id] = wanted.version
                    self.log.error("xds_snapshot_refused", node_id=node_id, version=wanted.version, reason=reason,
                                   effect="the proxy keeps the config it has")
                continue
            self.refused.pop(node_id, None)
            try:
                self.served[node_id] = ads_resources(wanted, node_id, bundle)
            except Exception as exc:  # noqa: BLE001 - a resource protobuf refuses: the proxy keeps what it has
                self.log.error("xds_resources_failed", node_id=node_id, version=wanted.version, error=str(exc))
                continue
            self.served_of[node_id] = stamp
        for node_id in set(self.served) - set(wanted_nodes.values()):
            del self.served[node_id]
            self.served_of.pop(node_id, None)
        self.server.update(dict(self.served))

    def acked(self, node_id: str, snapshot_version: str, streams: Mapping[str, Any]) -> bool:
        """Whether node_id runs what this controller serves it for snapshot_version: its stream (`streams`,
        mesh.xds.status.merged of every controller's, so on any controller: versions are content hashes)
        acknowledged every type at this controller's version."""
        from mesh.xds.resources import SHORT_NAMES

        served, stream = self.served.get(node_id), streams.get(node_id)
        if served is None or stream is None or self.served_of.get(node_id, ("",))[0] != snapshot_version:
            return False
        acked = {item.type: item.acked for item in stream.types}
        return all(acked.get(SHORT_NAMES.get(url, url)) == version for url, version in served.versions.items())

    def status(self) -> Mapping[str, Any]:
        return self.server.status() if self.server is not None else {}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.server_of = None
        self.served.clear()
        self.served_of.clear()

    def _bundle(self) -> str | None:
        """The trust bundle the controller holds (re-read when the file changes: a CA rotation)."""
        try:
            info = os.stat(self.bundle_path)
            stamp = (info.st_mtime, info.st_size)
            if self.bundle is None or self.bundle[0] != stamp:
                with open(self.bundle_path, encoding="ascii") as handle:
                    self.bundle = (stamp, handle.read())
        except (OSError, UnicodeDecodeError) as exc:
            self.log.error("xds_bundle_unreadable", path=self.bundle_path, error=str(exc))
            return None if self.bundle is None else self.bundle[1]
        return self.bundle[1]
