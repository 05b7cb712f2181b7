"""Envoy reloads the files mesh renders with no restart and no failed request (real Envoys on loopback, no lab).

`web` calls `api` through both Envoys, each started from a proxy folder laid out as a deploy lays out
/etc/mesh/proxies/<proxy> (bootstrap, xds/, ca.pem, the `tls` link), while a request loop runs. Then, with the
same Envoy processes: a route and cluster change moved into place (web's route now goes to a second api
instance), a new key and certificate for api swapped in by one rename of its `tls` link, and a broken cluster file
moved in (refused by validate_proxy_files first, then by Envoy, which keeps serving the previous files). And as in a
sidecar (the proxy folder a read-only bind mount in Envoy's own mount namespace): an endpoint file, a new
certificate and a new trust bundle moved into place reach Envoy.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from mesh.config import EnvoyRejectedConfig, compute_proxy_config
from mesh.config.compute import ADMIN_CLUSTER
from mesh.config.model import Endpoint, OutboundListener, WeightedCluster
from mesh.render import ProxyFiles, RenderedFile, render_proxy_files, static_bootstrap, validate_proxy_files
from mesh.testing.loopback import (
    Identity,
    RunningEnvoy,
    TwoServiceMesh,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    move_into_place,
    proxy_config_in,
    start_envoy,
    start_proxy,
    stop_envoys,
    swap_tls,
    two_service_mesh,
)

API_V2_ADDRESS = "127.0.0.4"  # the second api instance's host
WAIT_S = 20.0
QUIET_S = 1.5  # the loop keeps running this long after each change has been seen


# --- apps that say who answered ---

class _Named(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = json.dumps({"app": self.server.name}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _App(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Named)
        self.name = name


@contextlib.contextmanager
def app(name: str, port: int) -> Iterator[_App]:
    server = _App(name, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# --- the request loop ---

@dataclass
class RequestLoop:
    """GETs through web's outbound listener one after another (keep-alive, reconnecting after an error) until
    stopped; counts answers by app and every failure (an error or a status other than 200)."""

    port: int
    answers: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    last: str = ""
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stopping.is_set():
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures.append(f"{response.status} {body[:200]!r}")
                    continue
                self.last = json.loads(body)["app"]
                self.answers[self.last] = self.answers.get(self.last, 0) + 1
            except (OSError, http.client.HTTPException, ValueError) as error:
                self.failures.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        connection.close()

    @property
    def total(self) -> int:
        return sum(self.answers.values()) + len(self.failures)


@contextlib.contextmanager
def request_loop(port: int) -> Iterator[RequestLoop]:
    loop = RequestLoop(port)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.stopping.set()
        thread.join(timeout=10)


# --- what Envoy runs, read from its admin API ---

def config_dump(envoy: RunningEnvoy) -> list[dict[str, Any]]:
    return list(json.loads(envoy.admin("/config_dump?include_eds"))["configs"])


def dump_of(envoy: RunningEnvoy, kind: str) -> dict[str, Any]:
    return next(config for config in config_dump(envoy) if config["@type"].endswith(f".{kind}"))


def running_versions(envoy: RunningEnvoy) -> dict[str, str]:
    """{file name: version_info} of what Envoy runs, as /config_dump shows it: the last lds.yaml and cds.yaml
    it took, each route configuration and secret (one a file). It shows no version of endpoints:
    running_endpoints compares them by content."""
    listeners, clusters = dump_of(envoy, "ListenersConfigDump"), dump_of(envoy, "ClustersConfigDump")
    versions = {"lds.yaml": listeners["version_info"], "cds.yaml": clusters["version_info"]}
    for route in dump_of(envoy, "RoutesConfigDump").get("dynamic_route_configs", []):
        versions[f"rds.{route['route_config']['name']}.yaml"] = route["version_info"]
    for secret in dump_of(envoy, "SecretsConfigDump").get("dynamic_active_secrets", []):
        versions[f"sds.{secret['name']}.yaml"] = secret["version_info"]
    return versions


def file_versions(files: ProxyFiles) -> dict[str, str]:
    """{file name: version_info} of the resource files (but endpoints)."""
    return {Path(file.path).name: yaml.safe_load(file.content)["version_info"] for file in files.files
            if file.kind != "bootstrap" and not Path(file.path).name.startswith("eds.")}


def running_endpoints(envoy: RunningEnvoy) -> dict[str, list[tuple[str, int]]]:
    """{cluster: its endpoints' (address, port)} of every EDS cluster Envoy runs (not the metrics listener's
    mesh-admin, whose endpoint is the admin socket)."""
    found = {}
    for endpoints in dump_of(envoy, "EndpointsConfigDump").get("dynamic_endpoint_configs", []):
        assignment = endpoints["endpoint_config"]
        if assignment["cluster_name"] != ADMIN_CLUSTER:
            found[assignment["cluster_name"]] = _addresses(assignment)
    return found


def file_endpoints(files: ProxyFiles) -> dict[str, list[tuple[str, int]]]:
    return {resource["cluster_name"]: _addresses(resource) for resource in _resources(files)
            if resource["@type"].endswith("ClusterLoadAssignment")}


def _addresses(assignment: dict[str, Any]) -> list[tuple[str, int]]:
    return [(lb["endpoint"]["address"]["socket_address"]["address"],
             int(lb["endpoint"]["address"]["socket_address"]["port_value"]))
            for locality in assignment["endpoints"] for lb in locality["lb_endpoints"]]


def _resources(files: ProxyFiles) -> list[dict[str, Any]]:
    return [resource for file in files.files if file.kind != "bootstrap"
            for resource in yaml.safe_load(file.content)["resources"]]


def served_serial(address: str, port: int, client: Identity, folder: Path) -> int:
    """The serial of the certificate an inbound listener presents on a new TLS connection."""
    chain, key = folder / "client-chain.pem", folder / "client-key.pem"
    chain.write_bytes(client.chain)
    key.write_bytes(client.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cadata=client.root.decode())
    context.load_cert_chain(str(chain), str(key))
    with socket.create_connection((address, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="api") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def certs_serials(envoy: RunningEnvoy) -> set[int]:
    """The serials of the certificates Envoy holds (/certs), as integers."""
    serials = set()
    for entry in json.loads(envoy.admin("/certs"))["certificates"]:
        for chain in entry.get("cert_chain", []):
            serials.add(int(chain["serial_number"], 16))
    return serials


def ca_serials(envoy: RunningEnvoy) -> set[int]:
    """The serials of the CA certificates Envoy trusts (/certs ca_cert), as integers."""
    return {int(ca["serial_number"], 16) for entry in json.loads(envoy.admin("/certs"))["certificates"]
            for ca in entry.get("ca_cert", [])}


def stat(envoy: RunningEnvoy, name: str) -> int:
    for line in envoy.admin(f"/stats?filter=^{name}$").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


# --- the test ---

@dataclass(frozen=True)
class Setup:
    loop: TwoServiceMesh
    api_v2_port: int  # the second api instance's proxy port on API_V2_ADDRESS
    identities: dict[str, Identity]
    folder: Path


def routed_to(listener: OutboundListener, cluster: str) -> OutboundListener:
    """`listener` sending every request to `cluster`: its own cluster and each of its route's entries (the route
    named as the listener)."""
    assert listener.route is not None
    route = replace(listener.route, name=listener.name, routes=tuple(
        replace(entry, clusters=(WeightedCluster(cluster, 100),)) for entry in listener.route.routes))
    return replace(listener, cluster=cluster, route=route)


def web_files_routed_to_v2(setup: Setup, web_files: ProxyFiles, v2_port: int) -> ProxyFiles:
    """web's files after a route, cluster and listener change: a new cluster `upstream-api-v2` (the second api
    instance), web's api route pointing at it, and a new listener on v2_port that reaches it too."""
    loop = setup.loop
    cfg = proxy_config_in(compute_proxy_config(loop.mesh, loop.web), Path(web_files.proxy_dir),
                          loop.address(loop.web))
    old = cfg.cluster("upstream-api")
    v2 = replace(old, name="upstream-api-v2", endpoints=(Endpoint(API_V2_ADDRESS, setup.api_v2_port),))
    outbound = routed_to(cfg.outbound[0], v2.name)
    extra = routed_to(replace(cfg.outbound[0], name="outbound-api-v2", service="api-v2", port=v2_port), v2.name)
    return render_proxy_files(replace(cfg, clusters=(*cfg.clusters, v2), outbound=(outbound, extra)))


def test_route_cluster_and_certificate_changes_reload_without_restart_or_failure(tmp_path: Path) -> None:
    api_app_port, api_v2_app_port = free_port(), free_port()
    loop = two_service_mesh(api_app_port)
    api_v2 = replace(loop.api, host="h-api-v2", port=api_v2_app_port, proxy_port=free_port(API_V2_ADDRESS))
    identities = issue_identities(tmp_path / "state", loop.mesh.settings.trust_domain, (loop.web, loop.api))
    setup = Setup(loop, api_v2.proxy_port, identities, tmp_path)
    files = {
        "web": render_proxy_files(proxy_config_in(compute_proxy_config(loop.mesh, loop.web), tmp_path / "web",
                                                  loop.address(loop.web))),
        "api": render_proxy_files(proxy_config_in(compute_proxy_config(loop.mesh, loop.api), tmp_path / "api",
                                                  loop.address(loop.api))),
        # the second api instance: api's config with its own app port and proxy port, on 127.0.0.4
        "api-v2": render_proxy_files(proxy_config_in(compute_proxy_config(loop.mesh, api_v2), tmp_path / "api-v2",
                                                     API_V2_ADDRESS)),
    }
    for name, proxy_files in files.items():
        validate_proxy_files(proxy_files, identities["api" if name.startswith("api") else "web"].root)
        lay_out_proxy(proxy_files, identities["api" if name.startswith("api") else "web"])
    envoys: list[RunningEnvoy] = []
    try:
        with app("api-v1", api_app_port), app("api-v2", api_v2_app_port):
            for name, base_id in zip(files, free_base_ids(3), strict=True):
                envoys.append(start_proxy(name, files[name], base_id))
            web, api, _api_v2 = envoys
            pids = [envoy.process.pid for envoy in envoys]
            eventually(lambda: _answers(loop.outbound_port) == "api-v1", WAIT_S, "web reaches api-v1", web.log)
            assert running_versions(web) == file_versions(files["web"])
            assert running_endpoints(web) == file_endpoints(files["web"])
            server_info = json.loads(web.admin("/server_info"))
            assert server_info["node"]["metadata"]["mesh_bootstrap_sha256"] == files["web"].bootstrap_sha256

            with request_loop(loop.outbound_port) as requests:
                eventually(lambda: requests.answers.get("api-v1", 0) >= 20, WAIT_S, "the loop runs", web.log)

                # (1) a route, cluster and listener change: moved into place in ProxyFiles order, never a restart
                v2_port = free_port()
                routed = web_files_routed_to_v2(setup, files["web"], v2_port)
                validate_proxy_files(routed, identities["web"].root)
                moved = move_into_place(routed, files["web"])
                xds = f"{files['web'].proxy_dir}/xds"
                assert moved == [f"{xds}/eds.upstream-api-v2.yaml", f"{xds}/cds.yaml", f"{xds}/rds.outbound-api.yaml",
                                 f"{xds}/rds.outbound-api-v2.yaml", f"{xds}/lds.yaml"]
                eventually(lambda: requests.last == "api-v2", WAIT_S, "web's route now reaches api-v2", web.log)
                assert _answers(v2_port) == "api-v2"  # the new listener
                seen = requests.answers.get("api-v2", 0)
                time.sleep(QUIET_S)
                assert requests.answers.get("api-v2", 0) > seen and requests.last == "api-v2"
                assert running_versions(web) == file_versions(routed)
                assert running_endpoints(web) == file_endpoints(routed)
                files["web"] = routed

                # (2) a new key and certificate for api, swapped in by one rename of its `tls` link
                old_serial = served_serial(loop.address(loop.api), loop.api.proxy_port, identities["web"], tmp_path)
                renewed = issue_identities(tmp_path / "state", loop.mesh.settings.trust_domain, (loop.api,))["api"]
                new_serial = x509.load_pem_x509_certificate(renewed.chain).serial_number
                assert new_serial != old_serial
                swap_tls(Path(files["api"].proxy_dir), renewed, "2")
                eventually(lambda: new_serial in certs_serials(api), WAIT_S, "api's Envoy holds the new certificate",
                           api.log)
                assert served_serial(loop.address(loop.api), loop.api.proxy_port, identities["web"],
                                     tmp_path) == new_serial
                # web's route back to api-v1, so requests cross api's Envoy, now with its new certificate
                back = render_proxy_files(proxy_config_in(compute_proxy_config(loop.mesh, loop.web), tmp_path / "web",
                                                          loop.address(loop.web)))
                # upstream-api-v2 leaves: kept in a first cds.yaml until no route or listener names it, then removed
                assert move_into_place(back, files["web"]) == [f"{xds}/cds.yaml", f"{xds}/rds.outbound-api.yaml",
                                                               f"{xds}/lds.yaml", f"{xds}/cds.yaml"]
                assert not Path(xds, "eds.upstream-api-v2.yaml").exists()
                assert not Path(xds, "rds.outbound-api-v2.yaml").exists()
                with pytest.raises(OSError):
                    _answers(v2_port)  # the listener is gone
                files["web"] = back
                eventually(lambda: requests.last == "api-v1", WAIT_S, "web's route reaches api-v1 again", web.log)
                time.sleep(QUIET_S)
                assert requests.last == "api-v1"

                # (2b) api's inbound listener changes (its health chain's threshold): Envoy drains the old listener
                # while web's requests keep arriving through it
                api_cfg = proxy_config_in(compute_proxy_config(loop.mesh, loop.api), tmp_path / "api",
                                          loop.address(loop.api))
                health = replace(api_cfg.inbound.health, min_healthy_percent=50)
                relistened = render_proxy_files(replace(api_cfg, inbound=replace(api_cfg.inbound, health=health)))
                drained = stat(api, "listener_manager.listener_modified")
                assert move_into_place(relistened, files["api"]) == [f"{files['api'].proxy_dir}/xds/lds.yaml"]
                assert stat(api, "listener_manager.listener_modified") == drained + 1
                files["api"] = relistened
                time.sleep(QUIET_S)
                assert requests.last == "api-v1"

                # (3) a broken cluster file: refused by validate_proxy_files, then by Envoy, which keeps serving
                cds = next(file for file in files["web"].files if file.path.endswith("/cds.yaml"))
                # (an unknown enum value: by default Envoy would only warn and apply the rest; as the unit and the
                # sidecar run it, with --reject-unknown-dynamic-fields, it refuses the file)
                version = yaml.safe_load(cds.content)["version_info"]
                broken_cds = RenderedFile(cds.path, cds.content.replace("lb_policy: ROUND_ROBIN",
                                                                        "lb_policy: NO_SUCH_POLICY", 1)
                                          .replace(f"version_info: {version}", "version_info: broken"), cds.kind)
                broken = replace(files["web"], files=tuple(broken_cds if file is cds else file
                                                           for file in files["web"].files))
                with pytest.raises(EnvoyRejectedConfig, match="NO_SUCH_POLICY"):
                    validate_proxy_files(broken, identities["web"].root)
                rejected = stat(web, "cluster_manager.cds.update_rejected")
                with pytest.raises(RuntimeError, match="NO_SUCH_POLICY"):  # the host's check refuses it too
                    move_into_place(broken, files["web"])
                # moved in all the same: Envoy refuses it, and the install script says so once it waited wait_s
                started = time.monotonic()
                with pytest.raises(RuntimeError, match="Envoy did not take cds.yaml within 2 s"):
                    move_into_place(broken, files["web"], validate=False, wait_s=2)
                assert 2 <= time.monotonic() - started < 10
                assert stat(web, "cluster_manager.cds.update_rejected") > rejected
                time.sleep(QUIET_S)
                assert requests.last == "api-v1"
                # still the previous files (a listener that left drains with its route config for a while)
                assert file_versions(files["web"]).items() <= running_versions(web).items()
                answered_before_stop = sum(requests.answers.values())

            assert requests.failures == [], f"{len(requests.failures)} of {requests.total}: {requests.failures[:5]}"
            assert answered_before_stop >= 100 and requests.answers.get("api-v2", 0) > 0
            assert [envoy.process.pid for envoy in envoys] == pids
            assert all(envoy.process.poll() is None for envoy in envoys), "an Envoy exited"
            assert stat(web, "listener_manager.lds.update_success") >= 1
            assert stat(web, "server.hot_restart_epoch") == 0
    finally:
        stop_envoys(envoys)


def _answers(port: int) -> str | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read()
        return str(json.loads(body)["app"]) if response.status == 200 else None
    finally:
        connection.close()


@pytest.mark.needs_root(reason="bind mounts in a mount namespace of its own need root")
def test_a_read_only_folder_mount_sees_files_moved_into_place(tmp_path: Path) -> None:
    """As in a sidecar: the proxy folder is a read-only bind mount (admin/ a writable one) in Envoy's own mount
    namespace, and files moved into place on the host side reach it: an endpoint change and a new certificate."""
    loop = two_service_mesh(free_port())
    identities = issue_identities(tmp_path / "state", loop.mesh.settings.trust_domain, (loop.web,))
    cfg = proxy_config_in(compute_proxy_config(loop.mesh, loop.web), tmp_path / "web", loop.address(loop.web))
    files = render_proxy_files(cfg)
    lay_out_proxy(files, identities["web"])
    envoy = start_proxy("web", files, free_base_ids(1)[0], sidecar_mounts=True)
    try:
        assert Path(f"/proc/{envoy.process.pid}/ns/mnt").resolve() != Path("/proc/self/ns/mnt").resolve()
        mounts = Path(f"/proc/{envoy.process.pid}/mountinfo").read_text()
        assert any(line.split()[4] == files.proxy_dir and " ro" in f" {line.split()[5]}" for line in
                   mounts.splitlines()), "the proxy folder is not a read-only mount in Envoy's namespace"
        moved_endpoint = Endpoint("127.0.0.9", loop.api.proxy_port)
        upstream = replace(cfg.cluster("upstream-api"), endpoints=(moved_endpoint,))
        changed = render_proxy_files(replace(cfg, clusters=tuple(upstream if c.name == upstream.name else c
                                                                 for c in cfg.clusters)))
        assert move_into_place(changed, files) == [f"{files.proxy_dir}/xds/eds.upstream-api.yaml"]
        eventually(lambda: running_endpoints(envoy) == file_endpoints(changed), WAIT_S,
                   "Envoy runs the moved endpoints", envoy.log)
        renewed = issue_identities(tmp_path / "state", loop.mesh.settings.trust_domain, (loop.web,))["web"]
        serial = x509.load_pem_x509_certificate(renewed.chain).serial_number
        swap_tls(Path(files.proxy_dir), renewed, "2")
        eventually(lambda: serial in certs_serials(envoy), WAIT_S, "Envoy holds the new certificate", envoy.log)
        # a trust bundle with a second root (a CA rotation's first step), moved over ca.pem
        other = issue_identities(tmp_path / "other-state", loop.mesh.settings.trust_domain, (loop.web,))["web"]
        other_root = x509.load_pem_x509_certificate(other.root).serial_number
        staged = Path(files.proxy_dir, ".ca.pem.new")
        staged.write_bytes(identities["web"].root + other.root)
        os.replace(staged, Path(files.proxy_dir, "ca.pem"))
        eventually(lambda: other_root in ca_serials(envoy), WAIT_S, "Envoy trusts the new bundle", envoy.log)
        assert envoy.process.poll() is None
    finally:
        stop_envoys([envoy])


def test_moving_files_under_an_envoy_that_does_not_read_them_does_not_wait(tmp_path: Path) -> None:
    """An Envoy started from an older, static bootstrap (mesh before files) reads no xds file: the install script
    moves the new files without waiting for it (the restart for the new bootstrap follows)."""
    loop = two_service_mesh(free_port())
    identities = issue_identities(tmp_path / "state", loop.mesh.settings.trust_domain, (loop.web,))
    cfg = proxy_config_in(compute_proxy_config(loop.mesh, loop.web), tmp_path / "web", loop.address(loop.web))
    files = render_proxy_files(cfg)
    lay_out_proxy(files, identities["web"])
    # its admin socket where the files' bootstrap says (admin/admin.sock), its config static: every resource inline
    envoy = start_envoy("web-static", static_bootstrap(files, dynamic=False), Path(files.proxy_dir, "admin"),
                        free_base_ids(1)[0])
    try:
        upstream = replace(cfg.cluster("upstream-api"), endpoints=(Endpoint("127.0.0.9", loop.api.proxy_port),),
                           connect_timeout_ms=2_000)
        route = routed_to(cfg.outbound[0], "local-app")
        changed = render_proxy_files(replace(cfg, outbound=(route,), clusters=tuple(
            upstream if c.name == upstream.name else c for c in cfg.clusters)))
        started = time.monotonic()
        assert move_into_place(changed, files) == [f"{files.proxy_dir}/xds/{name}" for name in
                                                   ("eds.upstream-api.yaml", "cds.yaml", "rds.outbound-api.yaml")]
        assert time.monotonic() - started < 5
        assert envoy.process.poll() is None and stat(envoy, "cluster_manager.cds.update_attempt") == 0
    finally:
        stop_envoys([envoy])
