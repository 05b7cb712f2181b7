"""The ADS server against the real Envoy on loopback (no lab): the same ProxySnapshot mesh renders as files,
streamed by XdsServer over mTLS to an Envoy started with an ADS bootstrap.

`web` calls `api` through both Envoys. One of them takes its resources over ADS (its certificate, a leaf of mesh's
CA with its node id as DNS SAN, stays a file), the other from its files: Envoy's config dump shows every resource,
a request goes through, the server shows each type synced. A listener Envoy refuses (the test hook) is NACKed once:
the old listeners keep serving, the status says nacked with Envoy's message, and no response is resent. A TCP
service's authorization filters go over ADS too (ECDS): Envoy 1.40 takes them, and a run-time deny streamed as a
new filter closes the next connection. And one computation, two
deliveries: web's config dump from its files and from ADS are the same once config sources, versions and the
inline trust bundle are set aside.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from mesh.config import compute_proxy_config
from mesh.config.model import WeightedCluster
from mesh.controller.endpoints import Endpoint, ServiceEndpoints
from mesh.controller.snapshot import ProxySnapshot, proxy_snapshot
from mesh.inventory.model import Health, Mesh, Workload
from mesh.render import EXTENSION_CONFIG_TYPE, ProxyFiles, render_proxy_files
from mesh.testing.fake_ctl import proxy_spec
from mesh.testing.loopback import (
    APP_BODY,
    Identity,
    RunningEnvoy,
    TwoServiceMesh,
    app_process,
    eventually,
    free_base_ids,
    free_port,
    http_get,
    issue_identities,
    lay_out_proxy,
    mesh_proxy_files,
    proxy_config_in,
    start_envoy,
    start_proxy,
    stop_envoys,
    two_service_mesh,
)
from mesh.xds.resources import INVALID_LISTENER_NAME, ads_resources, assembled, packed, unpacked
from mesh.xds.server import XdsServer
from tests.xds_samples import FixedCert, LeafSigner, ads_bootstrap

TRUST_DOMAIN = "loop.mesh"
WAIT_S = 15.0


@dataclass
class Running:
    loop: TwoServiceMesh
    server: XdsServer
    over_ads: RunningEnvoy
    node_id: str
    files: ProxyFiles  # the ADS proxy's files (its folder laid out as a deploy does)
    hook: Path
    snapshot: ProxySnapshot
    bundle: str


def node_id_of(files: ProxyFiles) -> str:
    return str(yaml.safe_load(files.bootstrap.content)["node"]["id"])


def tcp_api(loop: TwoServiceMesh) -> TwoServiceMesh:
    api = replace(loop.api, protocol="tcp", health=Health("tcp"))
    hosts = tuple(replace(host, workloads=(api,)) if host.name == api.host else host for host in loop.mesh.hosts)
    return TwoServiceMesh(Mesh(loop.mesh.settings, hosts, (), {**loop.mesh.services, "api": (api,)}), loop.web, api)


@contextlib.contextmanager
def two_proxies(tmp_path: Path, over_ads: str, tcp: bool = False) -> Iterator[Running]:
    """web and api on loopback, `over_ads` ("web" or "api") streamed by an XdsServer, the other from files."""
    app_port = free_port()
    loop = two_service_mesh(app_port, TRUST_DOMAIN)
    loop = tcp_api(loop) if tcp else loop
    state = tmp_path / "state"
    identities = issue_identities(state, TRUST_DOMAIN, (loop.web, loop.api))
    signer = LeafSigner.of_mesh(state)
    bundle_path = tmp_path / "bundle.pem"
    bundle_path.write_bytes(signer.root_pem)
    workloads: dict[str, Workload] = {"web": loop.web, "api": loop.api}
    files = {name: mesh_proxy_files(loop, workload, tmp_path / name) for name, workload in workloads.items()}
    node_id = node_id_of(files[over_ads])
    leaf = signer.issue(workloads[over_ads].spiffe_id, (node_id,))  # the node id as DNS SAN (issue 23's leaves)
    identities[over_ads] = Identity(leaf.chain_pem, leaf.key_pem, signer.root_pem)
    for name in workloads:
        lay_out_proxy(files[name], identities[name])
    snapshot = ProxySnapshot(workloads[over_ads].host, files[over_ads], "test")
    hook = tmp_path / "xds-test-hook.json"
    server = XdsServer(0, FixedCert(signer.serving_cert(TRUST_DOMAIN)), str(bundle_path), TRUST_DOMAIN,
                       host="127.0.0.1", test_hook_path=str(hook))
    server.update({node_id: ads_resources(snapshot, node_id, signer.root_pem.decode())})
    server.start()
    assert server.serving
    envoys: list[RunningEnvoy] = []
    base_ids = free_base_ids(2)
    try:
        with app_process(app_port):
            folder = Path(files[over_ads].proxy_dir)
            config = ads_bootstrap(files[over_ads].bootstrap.content, server.port, TRUST_DOMAIN,
                                   str(folder / "xds" / "sds.proxy-cert.yaml"), str(folder / "ca.pem"))
            envoys.append(start_envoy(f"{over_ads}-ads", config, tmp_path / f"{over_ads}-ads", base_ids[0],
                                      ("--reject-unknown-dynamic-fields",)))
            other = "api" if over_ads == "web" else "web"
            envoys.append(start_proxy(other, files[other], base_ids[1]))
            yield Running(loop, server, envoys[0], node_id, files[over_ads], hook, snapshot,
                          signer.root_pem.decode())
    finally:
        stop_envoys(envoys)
        server.stop()


def config_dump(envoy: RunningEnvoy) -> dict[str, dict[str, Any]]:
    configs = json.loads(envoy.admin("/config_dump?include_eds"))["configs"]
    return {config["@type"].rsplit(".", 1)[-1]: config for config in configs}


def dynamic_names(envoy: RunningEnvoy) -> dict[str, set[str]]:
    dump = config_dump(envoy)
    return {
        "listeners": {item["name"] for item in dump["ListenersConfigDump"].get("dynamic_listeners", [])
                      if "active_state" in item},
        "clusters": {item["cluster"]["name"] for item in dump["ClustersConfigDump"].get("dynamic_active_clusters", [])},
        "routes": {item["route_config"]["name"] for item in dump["RoutesConfigDump"].get("dynamic_route_configs", [])},
        "endpoints": {item["endpoint_config"]["cluster_name"]
                      for item in dump["EndpointsConfigDump"].get("dynamic_endpoint_configs", [])},
        "secrets": {item["name"] for item in dump["SecretsConfigDump"].get("dynamic_active_secrets", [])},
    }


def through_web(loop: TwoServiceMesh) -> bytes | None:
    status, body = http_get(f"http://127.0.0.1:{loop.outbound_port}/", timeout=3)
    return body if status == 200 else None


def refused_through_web(loop: TwoServiceMesh) -> bool | None:
    try:
        through_web(loop)
    except (OSError, http.client.HTTPException):
        return True
    return None


def states(server: XdsServer, node_id: str) -> dict[str, str]:
    stream = server.status().get(node_id)
    return {} if stream is None else {item.type: item.state for item in stream.types}


def responses(server: XdsServer, node_id: str, kind: str) -> int:
    return next(item.responses for item in server.status()[node_id].types if item.type == kind)


def test_envoy_runs_what_ads_streams_and_a_request_goes_through(tmp_path: Path) -> None:
    with two_proxies(tmp_path, "web") as running:
        names = dynamic_names(running.over_ads)
        resources = ads_resources(running.snapshot, running.node_id, running.bundle)
        assert names["listeners"] == set(resources.names("type.googleapis.com/envoy.config.listener.v3.Listener"))
        assert names["clusters"] == set(resources.names("type.googleapis.com/envoy.config.cluster.v3.Cluster"))
        assert names["routes"] == set(resources.names(
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"))
        assert names["endpoints"] >= {"upstream-api"}
        assert names["secrets"] >= {"proxy-cert", "mesh-ca"}  # the certificate from its file, the bundle from ADS
        assert eventually(lambda: through_web(running.loop), WAIT_S, "a request through web over ADS") == APP_BODY
        assert eventually(lambda: set(states(running.server, running.node_id).values()) == {"synced"} or None,
                          WAIT_S, "every type synced")
        assert set(states(running.server, running.node_id)) == {"CDS", "EDS", "LDS", "RDS", "SDS"}


def test_a_refused_listener_is_nacked_once_and_the_old_ones_keep_serving(tmp_path: Path) -> None:
    with two_proxies(tmp_path, "web") as running:
        server, node = running.server, running.node_id
        eventually(lambda: states(server, node).get("LDS") == "synced" or None, WAIT_S, "LDS synced")
        given = {node: ads_resources(running.snapshot, node, running.bundle)}
        assert responses(server, node, "LDS") == 1
        running.hook.write_text(json.dumps({"node_id": node, "type": "LDS"}))
        server.update(given)
        eventually(lambda: states(server, node).get("LDS") == "nacked" or None, WAIT_S, "LDS nacked")
        [lds] = [item for item in server.status()[node].types if item.type == "LDS"]
        assert lds.error and "not-an-ip" in lds.error  # Envoy's own message
        for _ in range(3):  # the same refused version is never sent again
            server.update(given)
            time.sleep(0.3)
        assert responses(server, node, "LDS") == 2
        assert states(server, node)["LDS"] == "nacked"
        assert INVALID_LISTENER_NAME not in dynamic_names(running.over_ads)["listeners"]
        assert through_web(running.loop) == APP_BODY  # the old listeners keep serving
        running.hook.unlink()
        server.update(given)
        eventually(lambda: states(server, node).get("LDS") == "synced" or None, WAIT_S, "LDS synced again")
        assert responses(server, node, "LDS") == 3
        assert server.status()[node].types[2].error is None


def test_a_tcp_service_takes_its_authorization_filters_over_ads(tmp_path: Path) -> None:
    with two_proxies(tmp_path, "api", tcp=True) as running:
        dump = config_dump(running.over_ads)
        ecds = dump["EcdsConfigDump"]["ecds_filters"]
        assert {item["ecds_filter"]["name"] for item in ecds} == {"mesh.authz.deny", "mesh.authz.allow"}
        assert eventually(lambda: through_web(running.loop), WAIT_S, "a request to the TCP api over ADS") == APP_BODY
        eventually(lambda: states(running.server, running.node_id).get("ECDS") == "synced" or None, WAIT_S,
                   "ECDS synced")
        # a run-time deny of every caller, streamed as a new ECDS resource, closes the next connection
        served = ads_resources(running.snapshot, running.node_id, running.bundle)
        deny = unpacked(served.by_type[EXTENSION_CONFIG_TYPE]["mesh.authz.deny"])
        deny["typed_config"]["rules"] = {"action": "DENY", "policies": {"everyone": {
            "permissions": [{"any": True}], "principals": [{"any": True}]}}}
        entries = [(url, name, data, served.digests[url][name]) for url, named in served.by_type.items()
                   for name, data in named.items() if (url, name) != (EXTENSION_CONFIG_TYPE, "mesh.authz.deny")]
        entries.append((EXTENSION_CONFIG_TYPE, "mesh.authz.deny", packed(deny), "deny-everyone"))
        running.server.update({running.node_id: assembled(running.node_id, entries)})
        eventually(lambda: refused_through_web(running.loop), WAIT_S, "the deny over ECDS closes connections")
        running.server.update({running.node_id: served})
        assert eventually(lambda: through_web(running.loop), WAIT_S, "allowed again") == APP_BODY


def normalized(dump: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The dynamic resources of a config dump with what differs by delivery set aside: config sources (a path or
    ADS), version_info and last_updated, the trust bundle (a file or inline) and the watched folders."""

    def strip(value: Any) -> Any:
        if isinstance(value, list):
            return [strip(item) for item in value]
        if not isinstance(value, dict):
            return value
        if "path_config_source" in value or "ads" in value:
            return "<source>"
        return {key: ("<ca>" if key == "trusted_ca" else strip(item)) for key, item in value.items()
                if key not in ("version_info", "last_updated", "watched_directory")}

    listeners = {item["name"]: strip(item["active_state"]["listener"])
                 for item in dump["ListenersConfigDump"].get("dynamic_listeners", [])}
    clusters = {item["cluster"]["name"]: strip(item["cluster"])
                for item in dump["ClustersConfigDump"].get("dynamic_active_clusters", [])}
    routes = {item["route_config"]["name"]: strip(item["route_config"])
              for item in dump["RoutesConfigDump"].get("dynamic_route_configs", [])}
    endpoints = {item["endpoint_config"]["cluster_name"]: strip(item["endpoint_config"])
                 for item in dump["EndpointsConfigDump"].get("dynamic_endpoint_configs", [])}
    secrets = {item["name"]: strip(item["secret"])
               for item in dump["SecretsConfigDump"].get("dynamic_active_secrets", [])}
    return {"listeners": listeners, "clusters": clusters, "routes": routes, "endpoints": endpoints,
            "secrets": secrets}


def test_one_computation_two_deliveries(tmp_path: Path) -> None:
    """web's Envoy from its files, then (same ports) from ADS: the same resources run."""
    signer, files, node_id = _web_laid_out(tmp_path)
    [base_id] = free_base_ids(1)
    from_files = start_proxy("web-files", files, base_id)
    try:
        eventually(lambda: "upstream-api" in dynamic_names(from_files)["endpoints"] or None, WAIT_S, "files loaded")
        by_files = normalized(config_dump(from_files))
    finally:
        stop_envoys([from_files])
    (tmp_path / "bundle.pem").write_bytes(signer.root_pem)
    server = XdsServer(0, FixedCert(signer.serving_cert(TRUST_DOMAIN)), str(tmp_path / "bundle.pem"),
                       TRUST_DOMAIN, host="127.0.0.1")
    server.update({node_id: ads_resources(ProxySnapshot("h-web", files, "t"), node_id, signer.root_pem.decode())})
    server.start()
    folder = Path(files.proxy_dir)
    config = ads_bootstrap(files.bootstrap.content, server.port, TRUST_DOMAIN,
                           str(folder / "xds" / "sds.proxy-cert.yaml"), str(folder / "ca.pem"))
    from_ads = start_envoy("web-ads", config, tmp_path / "web-ads", base_id, ("--reject-unknown-dynamic-fields",))
    try:
        eventually(lambda: "upstream-api" in dynamic_names(from_ads)["endpoints"] or None, WAIT_S, "ADS loaded")
        by_ads = normalized(config_dump(from_ads))
    finally:
        stop_envoys([from_ads])
        server.stop()
    assert by_ads == by_files
    assert set(by_ads["listeners"]) == {"inbound", "outbound-api", "metrics"}


@pytest.fixture(autouse=True)
def _quiet_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_VERBOSITY", "ERROR")


def test_a_failover_resends_no_listener_or_cluster_and_a_later_change_arrives(tmp_path: Path) -> None:
    """web's ADS cluster lists two controllers serving the same snapshot; the one it streams from stops: the other
    takes the stream with no LDS or CDS response (same content, same version), and a change made after the kill
    reaches Envoy."""
    signer, files, node_id = _web_laid_out(tmp_path)
    (tmp_path / "bundle.pem").write_bytes(signer.root_pem)
    snapshot = ProxySnapshot("h-web", files, "t")
    servers = [XdsServer(0, FixedCert(signer.serving_cert(TRUST_DOMAIN)), str(tmp_path / "bundle.pem"),
                         TRUST_DOMAIN, host="127.0.0.1") for _ in range(2)]
    for server in servers:
        server.update({node_id: ads_resources(snapshot, node_id, signer.root_pem.decode())})
        server.start()
    folder = Path(files.proxy_dir)
    config = ads_bootstrap(files.bootstrap.content, tuple(server.port for server in servers), TRUST_DOMAIN,
                           str(folder / "xds" / "sds.proxy-cert.yaml"), str(folder / "ca.pem"))
    [base_id] = free_base_ids(1)
    envoy = start_envoy("web-ads", config, tmp_path / "web-ads", base_id, ("--reject-unknown-dynamic-fields",))
    try:
        first = eventually(lambda: next((server for server in servers
                                         if set(states(server, node_id).values()) == {"synced"}), None),
                           WAIT_S, "one controller's stream synced")
        second = servers[1 - servers.index(first)]
        assert second.status() == {}
        listeners_before = config_dump(envoy)["ListenersConfigDump"]["version_info"]
        first.stop()
        eventually(lambda: set(states(second, node_id).values()) == {"synced"} or None, WAIT_S,
                   "the other controller's stream synced")
        assert responses(second, node_id, "LDS") == 0 and responses(second, node_id, "CDS") == 0
        assert config_dump(envoy)["ListenersConfigDump"]["version_info"] == listeners_before
        moved = proxy_snapshot("h-web", proxy_spec(files), {"api": ServiceEndpoints(
            "api", (Endpoint("127.0.0.9", 9999),), (Endpoint("127.0.0.9", 9999),))})
        second.update({node_id: ads_resources(moved, node_id, signer.root_pem.decode())})

        def upstream_api() -> list[str]:
            dump = config_dump(envoy)["EndpointsConfigDump"].get("dynamic_endpoint_configs", [])
            return [lb["endpoint"]["address"]["socket_address"]["address"] for item in dump
                    if item["endpoint_config"]["cluster_name"] == "upstream-api"
                    for locality in item["endpoint_config"]["endpoints"] for lb in locality["lb_endpoints"]]

        eventually(lambda: upstream_api() == ["127.0.0.9"] or None, WAIT_S, "the change made after the kill")
        assert responses(second, node_id, "LDS") == 0 and responses(second, node_id, "CDS") == 0
    finally:
        stop_envoys([envoy])
        for server in servers:
            server.stop()


@contextlib.contextmanager
def request_loop(port: int) -> Iterator[dict[str, int]]:
    """GETs through web's outbound listener one after another until the block ends: {"ok": n, "failed": n}."""
    counts = {"ok": 0, "failed": 0}
    stopping = threading.Event()

    def run() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stopping.is_set():
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                body = response.read()
                counts["ok" if response.status == 200 and body == APP_BODY else "failed"] += 1
            except (OSError, http.client.HTTPException):
                counts["failed"] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stopping.set()
        thread.join(timeout=10)


def test_a_route_moved_to_a_new_cluster_while_the_old_one_leaves_fails_no_request(tmp_path: Path) -> None:
    with two_proxies(tmp_path, "web") as running:
        loop, server, node = running.loop, running.server, running.node_id
        cfg = proxy_config_in(compute_proxy_config(loop.mesh, loop.web), Path(running.files.proxy_dir),
                              loop.address(loop.web))
        old = cfg.cluster("upstream-api")
        moved_cluster = replace(old, name="upstream-api-moved")
        listener = cfg.outbound[0]
        assert listener.route is not None
        route = replace(listener.route, routes=tuple(
            replace(entry, clusters=(WeightedCluster(moved_cluster.name, 100),)) for entry in listener.route.routes))
        moved = render_proxy_files(replace(
            cfg, clusters=tuple(moved_cluster if item.name == old.name else item for item in cfg.clusters),
            outbound=(replace(listener, cluster=moved_cluster.name, route=route),)))
        eventually(lambda: through_web(loop), WAIT_S, "a request through web")
        with request_loop(loop.outbound_port) as counts, capture_logs() as logs:
            eventually(lambda: counts["ok"] >= 20 or None, WAIT_S, "the loop runs")
            server.update({node: ads_resources(ProxySnapshot("h-web", moved, "t"), node, running.bundle)})
            eventually(lambda: dynamic_names(running.over_ads)["clusters"] >= {"upstream-api-moved"}
                       and "upstream-api" not in dynamic_names(running.over_ads)["clusters"] or None,
                       WAIT_S, "the moved cluster in, the old one out")
            seen = counts["ok"]
            eventually(lambda: counts["ok"] >= seen + 20 or None, WAIT_S, "the loop goes on")
        assert counts["failed"] == 0, counts
        assert not [entry for entry in logs if entry["event"] == "xds_clusters_not_ready"]  # no release by timeout
        eventually(lambda: set(states(server, node).values()) == {"synced"} or None, WAIT_S, "every type synced")
        assert responses(server, node, "CDS") == 3  # the first, then keeping upstream-api, then without it


def _web_laid_out(tmp_path: Path) -> tuple[LeafSigner, Any, str]:
    """The loopback mesh's CA's signer, web's rendered files laid out with a leaf naming its node id, and that
    node id."""
    loop = two_service_mesh(free_port(), TRUST_DOMAIN)
    issue_identities(tmp_path / "state", TRUST_DOMAIN, (loop.web,))
    signer = LeafSigner.of_mesh(tmp_path / "state")
    files = mesh_proxy_files(loop, loop.web, tmp_path / "web")
    node_id = node_id_of(files)
    leaf = signer.issue(loop.web.spiffe_id, (node_id,))
    lay_out_proxy(files, Identity(leaf.chain_pem, leaf.key_pem, signer.root_pem))
    return signer, files, node_id
