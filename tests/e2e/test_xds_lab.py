"""End to end on the lab (issue 23): the controllers serve every proxy over ADS, one test per item of the issue's
"Done when" list that the parametrized drain, route and authorization tests do not cover.

- Identity on the stream: a client on vm2 holding api's real certificate (its DNS SAN names api's node id) gets
  api's listeners from every controller's ADS port, and is refused web's (vm1's node id) with PERMISSION_DENIED;
  a certificate of another CA, and none, are refused at TLS.
- NACK: the controllers' test hook gives web's node one listener Envoy refuses: web's Envoy keeps serving with its
  old listeners, `mesh status` shows web's LDS NACKed with Envoy's error, and the controller logged it once.
- One controller killed (the one holding web's stream) under a request loop from vm1 through web to api: no
  request fails, every proxy streams from the other one, and a drain made after the kill reaches web's Envoy.
- Every controller stopped and vm1 rebooted: vm1 serves from its files (the start step's marker says so); the
  controllers started: vm1 is on ADS again and a new drain reaches it.

The ADS client is a small gRPC client run by this machine's Python inside a lab node's network namespace (the
controllers' nftables open the ADS port to the mesh's hosts only), speaking TLS through a local forwarder: the
controller is named by its SPIFFE ID, not a DNS name, which gRPC's own TLS would insist on.

The module holds the shared lab lock throughout, deploys inventory/lab.yaml with `mesh_delivery: xds` (every proxy
seen on ADS), leaves the lab as it found it after every test (hook removed, controllers started, drain undone) and
deploys inventory/lab.yaml back at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from controller_helpers import (
    API_INSTANCES,
    CONTROLLERS,
    failures,
    traffic,
    web_api_hosts,
)
from delivery_helpers import (
    LabProxy,
    admin,
    assert_delivery,
    delivery_inventory,
    delivery_seen,
    lab_proxies,
    lab_proxy,
    xds_connections,
)
from deploy_helpers import Run, hops, out, run_mesh, sh, shared_lab, wait_for
from lab_helpers import LabUp
from rollout_helpers import chain_ok, deploy, deploy_lab_back, lab_state_dir, proxy_status, status_json

from mesh.config import paths
from mesh.config.tracing import CONTROLLER_SERVER_NAME
from mesh.config.xds import XDS_PORT
from mesh.controller.daemon import XDS_TEST_HOOK
from mesh.controller.spec import CONTROLLER_UNIT
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import controller_spiffe_id
from mesh.lab.network import NETNS_PREFIX
from mesh.render import LISTENER_TYPE
from mesh.testing.health_endpoint import TestCA
from mesh.xds.resources import INVALID_LISTENER_NAME

PUSH_WAIT = 60.0  # a Consul change reaching an Envoy: the goal is under a second; this only bounds the test
BACK_ON_ADS_WAIT = 300.0  # controllers back: a file-started proxy drained and restarted on ADS
BOTH = set(API_INSTANCES.values())
DOCK1_ONLY = {API_INSTANCES["dock1"]}
NO_RESTART_DROPIN = f"/run/systemd/system/{CONTROLLER_UNIT}.d/e2e-no-restart.conf"


@dataclass(frozen=True)
class Xds:
    lab: LabUp
    inventory: Path  # inventory/lab.yaml with mesh_delivery: xds
    trust_domain: str

    @property
    def proxies(self) -> list[LabProxy]:
        return lab_proxies(self.inventory)

    def proxy(self, host: str, service: str) -> LabProxy:
        return lab_proxy(self.inventory, host, service)


@pytest.fixture(scope="module")
def xds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xds]:
    with shared_lab() as lab:
        inventory = delivery_inventory(tmp_path_factory.mktemp("xds-lab"), "xds")
        trust_domain = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh.settings.trust_domain
        try:
            run = deploy(inventory)
            assert run.code == 0, f"inventory/lab.yaml with mesh_delivery: xds could not be deployed:\n{run}"
            wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "web -> api -> db after the xds deploy", timeout=60)
            assert_delivery(lab, inventory, "xds")
            yield Xds(lab, inventory, trust_domain)
        finally:
            deploy_lab_back(lab)


@pytest.fixture(autouse=True)
def as_found(xds: Xds) -> Iterator[Xds]:
    """After each test, whatever it did: no test hook, every controller running, vm1 up, the drain undone."""
    lab = xds.lab
    try:
        yield xds
    finally:
        for host in CONTROLLERS:
            sh(lab, host, f"rm -f {XDS_TEST_HOOK} {NO_RESTART_DROPIN} && systemctl daemon-reload && "
                          f"systemctl reset-failed {CONTROLLER_UNIT}; systemctl start {CONTROLLER_UNIT}")
        wait_for(lambda: _boot_id(lab, "vm1"), bool, "vm1 answering over SSH", timeout=240, interval=2.0)
        run_mesh("drain", "-i", str(xds.inventory), "api", "vm2", "--undo", timeout=120)


def _boot_id(lab: LabUp, host: str) -> str:
    done = sh(lab, host, "cat /proc/sys/kernel/random/boot_id", timeout=15)
    return done.stdout.strip() if done.returncode == 0 else ""


def _drain(xds: Xds, undo: bool = False) -> Run:
    run = run_mesh("drain", "-i", str(xds.inventory), "api", "vm2", *(["--undo"] if undo else []), timeout=120)
    assert run.code == 0, str(run)
    return run


def _wait_for_api_hosts(lab: LabUp, wanted: set[str], what: str, timeout: float = PUSH_WAIT) -> None:
    wait_for(lambda: web_api_hosts(lab), lambda seen: seen == wanted, what, timeout=timeout)


def _assert_no_failed_request(requests: list[Any], at_least: int = 50) -> None:
    assert len(requests) >= at_least, f"the request loop hardly ran ({len(requests)} requests): it proves nothing"
    failed = failures(requests)
    assert not failed, f"{len(failed)} of {len(requests)} requests failed: {failed[:20]}"


# ---- an ADS client in a lab node's network namespace ---------------------------------------------------------

_ADS_CLIENT = r"""
import asyncio, json, ssl, sys, threading
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

address, port, server_name, ca, node_id, type_url = sys.argv[1:7]
cert, key = (sys.argv[7], sys.argv[8]) if len(sys.argv) > 8 else (None, None)
seen = {"tls_error": "", "peer_uris": [], "code": "", "details": "", "responses": []}

context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False  # the controller is named by its SPIFFE ID (a URI SAN): reported, the test checks it
context.load_verify_locations(ca)
if cert:
    context.load_cert_chain(cert, key)
context.set_alpn_protocols(["h2"])


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError) as exc:
        seen["tls_error"] = seen["tls_error"] or f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()


async def forward(client_reader, client_writer):
    try:
        reader, writer = await asyncio.open_connection(address, int(port), ssl=context, server_hostname=server_name)
    except (OSError, ssl.SSLError) as exc:
        seen["tls_error"] = f"{type(exc).__name__}: {exc}"
        client_writer.close()
        return
    peer = writer.get_extra_info("peercert") or {}
    seen["peer_uris"] = [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]
    await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))


loop = asyncio.new_event_loop()
server = loop.run_until_complete(asyncio.start_server(forward, "127.0.0.1", 0))
local = server.sockets[0].getsockname()[1]
threading.Thread(target=loop.run_forever, daemon=True).start()

channel = grpc.insecure_channel(f"127.0.0.1:{local}", options=[("grpc.enable_http_proxy", 0)])
stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
finished = threading.Event()


def requests():
    yield discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id, cluster="mesh-e2e-probe"), type_url=type_url)
    finished.wait(20)


call = stub.StreamAggregatedResources(requests(), timeout=20)
try:
    for response in call:
        seen["responses"].append({"type_url": response.type_url, "version": response.version_info,
                                  "resources": len(response.resources)})
        break
except grpc.RpcError as exc:
    seen["code"], seen["details"] = exc.code().name, exc.details() or ""
finally:
    finished.set()
    call.cancel()
print(json.dumps(seen))
"""


@dataclass(frozen=True)
class AdsSeen:
    """What the ADS client saw: TLS trouble, the controller's URI SANs, the gRPC status, the responses."""

    tls_error: str
    peer_uris: tuple[str, ...]
    code: str
    details: str
    responses: tuple[dict[str, Any], ...]

    def brief(self) -> str:
        return (f"code={self.code or '-'} details={self.details[:200]!r} tls={self.tls_error[:200]!r} "
                f"peer={list(self.peer_uris)} responses={list(self.responses)}")


def ads_ask(lab: LabUp, source: str, controller: str, server_name: str, ca: Path, node_id: str,
            client: tuple[Path, Path] | None) -> AdsSeen:
    """From source's network namespace, open an ADS stream to controller:XDS_PORT with client's certificate and
    key (none: no client certificate) and ask for node_id's listeners; wait for the first response or the end."""
    argv = [lab.hosts[controller], str(XDS_PORT), server_name, str(ca), node_id, LISTENER_TYPE]
    if client is not None:
        argv += [str(client[0]), str(client[1])]
    done = subprocess.run(["ip", "netns", "exec", f"{NETNS_PREFIX}{source}", sys.executable, "-c", _ADS_CLIENT,
                           *argv], capture_output=True, text=True, timeout=90, check=False)
    try:
        seen = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"the ADS client in {source}'s namespace printed no result (exit {done.returncode}):"
                             f"\n{done.stdout}\n{done.stderr}") from None
    return AdsSeen(seen["tls_error"], tuple(seen["peer_uris"]), seen["code"], seen["details"],
                   tuple(seen["responses"]))


def _copy_identity(lab: LabUp, proxy: LabProxy, folder: Path) -> tuple[Path, Path]:
    """The proxy's certificate chain and key copied from its host (root reads them, as an intruder would) into a
    private folder here."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    copies = []
    for name, path in (("cert.pem", paths.cert_path(proxy.proxy)), ("key.pem", paths.key_path(proxy.proxy))):
        target = folder / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(out(lab, proxy.host, f"cat {path}"))
        copies.append(target)
    return copies[0], copies[1]


def test_a_proxy_gets_its_own_config_and_is_refused_another_proxys_or_a_foreign_certificate(
        xds: Xds, tmp_path: Path) -> None:
    lab = xds.lab
    api, web = xds.proxy("vm2", "api"), xds.proxy("vm1", "web")
    root = Path(lab_state_dir()) / "ca" / "root.pem"
    server_name = CONTROLLER_SERVER_NAME.format(trust_domain=xds.trust_domain)
    stolen = _copy_identity(lab, api, tmp_path / "api")
    foreign_ca = TestCA(tmp_path / "other", "other CA").issue(f"spiffe://{xds.trust_domain}/svc/web", "other-ca")
    try:
        for controller in CONTROLLERS:
            def ask(node_id: str, client: tuple[Path, Path] | None, at: str = controller) -> AdsSeen:
                return ads_ask(lab, api.host, at, server_name, root, node_id, client)

            # the control: api's certificate asking for api's own node id gets its listeners from a controller
            own = ask(api.node_id, stolen)
            assert own.responses and own.responses[0]["type_url"] == LISTENER_TYPE, \
                f"{controller} did not stream api's listeners to api's own certificate: {own.brief()}"
            assert own.responses[0]["resources"] > 0, own.brief()
            assert own.peer_uris == (controller_spiffe_id(xds.trust_domain),), own.brief()

            other = ask(web.node_id, stolen)
            assert other.code == "PERMISSION_DENIED" and not other.responses, \
                f"{controller} with api's certificate asking for web's node {web.node_id}: {other.brief()}"

            for what, client in (("another CA's certificate", (foreign_ca.cert, foreign_ca.key)),
                                 ("no client certificate", None)):
                seen = ask(web.node_id, client)
                assert not seen.responses, f"{controller} streamed to {what}: {seen.brief()}"
                assert seen.code not in ("", "OK", "PERMISSION_DENIED", "NOT_FOUND"), \
                    f"{what} passed TLS at {controller} (refused only after it): {seen.brief()}"
                assert seen.tls_error or seen.code == "UNAVAILABLE", f"{what} at {controller}: {seen.brief()}"
    finally:
        for path in stolen:
            path.unlink(missing_ok=True)


# ---- NACK ------------------------------------------------------------------------------------------------------

def _xds_status(xds: Xds, proxy: LabProxy) -> dict[str, Any]:
    """The proxy's ADS status as `mesh status --json` shows it (its `xds`: node_id, running, controller, state,
    types: [{type, state, sent, acked, error}])."""
    return dict(proxy_status(status_json(xds.inventory), proxy.host, proxy.proxy).get("xds") or {})


def _lds_states(xds: Xds, proxy: LabProxy) -> list[dict[str, Any]]:
    return [item for item in _xds_status(xds, proxy).get("types") or [] if item.get("type") == "LDS"]


def _nack_lines(lab: LabUp, since: int, node_id: str) -> dict[str, list[str]]:
    """Per controller, its journal's lines since `since` (epoch seconds) that log a NACK of node_id."""
    return {host: [line for line in out(lab, host, f"journalctl -u {CONTROLLER_UNIT} --since @{since} -o cat "
                                                   "--no-pager; true", timeout=60).splitlines()
                   if "xds_nacked" in line and node_id in line]
            for host in CONTROLLERS}


def _listener_names(lab: LabUp, proxy: LabProxy) -> list[str]:
    """The names of the listeners the proxy's Envoy runs (its active dynamic ones, from /config_dump; a refused
    one shows there too, in an error state)."""
    dump = json.loads(admin(lab, proxy, "/config_dump?resource=dynamic_listeners") or "{}")
    return sorted(str(config.get("name")) for config in dump.get("configs") or [] if "active_state" in config)


LDS_REJECTED = "listener_manager.lds.update_rejected"
XDS_CONNECTIONS = "cluster.mesh-xds.upstream_cx_total"  # ADS connections the Envoy opened since it started


def _stat(lab: LabUp, proxy: LabProxy, name: str) -> int:
    """A counter of the proxy's Envoy (-1 when it does not show it)."""
    for line in admin(lab, proxy, f"/stats?filter={name.rsplit('.', 1)[-1]}").splitlines():
        found, _, value = line.partition(": ")
        if found.strip() == name and value.strip().isdigit():
            return int(value)
    return -1


def test_an_invalid_listener_is_nacked_the_old_config_serves_and_the_controller_reports_it_once(xds: Xds) -> None:
    lab = xds.lab
    web = xds.proxy("vm1", "web")
    _wait_for_api_hosts(lab, BOTH, "web's Envoy on vm1 sending to both api instances")
    listeners = _listener_names(lab, web)
    rejected, connections = _stat(lab, web, LDS_REJECTED), _stat(lab, web, XDS_CONNECTIONS)
    assert listeners and rejected >= 0 and connections >= 1, \
        f"web's Envoy on vm1 shows no listeners ({listeners}), LDS rejections ({rejected}) or ADS connections"
    since = int(time.time()) - 1
    hook = json.dumps({"node_id": web.node_id, "type": "LDS"})
    for host in CONTROLLERS:
        out(lab, host, f"umask 022 && cat > {XDS_TEST_HOOK}.tmp && mv {XDS_TEST_HOOK}.tmp {XDS_TEST_HOOK}",
            input=hook)
    with traffic(lab) as trace:
        _drain(xds)  # a change: the push it makes to web carries the hook's listener
        _wait_for_api_hosts(lab, DOCK1_ONLY, "the drain reaching web's Envoy on vm1 (EDS) with the hook in place")
        wait_for(lambda: _stat(lab, web, LDS_REJECTED), lambda seen: seen > rejected,
                 "web's Envoy on vm1 rejecting an LDS update", timeout=PUSH_WAIT)
        states = wait_for(lambda: _lds_states(xds, web),
                          lambda found: any(item.get("state") == "nacked"
                                            and INVALID_LISTENER_NAME in str(item.get("error")) for item in found),
                          f"`mesh status --json` showing {web.node_id}'s LDS NACKed with Envoy's error naming "
                          f"{INVALID_LISTENER_NAME}",
                          timeout=PUSH_WAIT, interval=3.0)
        print(f"{web.node_id}'s LDS in `mesh status --json`: {states}")
        _drain(xds, undo=True)  # another push to web: the same NACKed listeners must not be sent again
        _wait_for_api_hosts(lab, BOTH, "the drain's undo reaching web's Envoy on vm1")
        time.sleep(5.0)
    _assert_no_failed_request(trace.requests)
    assert _listener_names(lab, web) == listeners, "web's Envoy on vm1 does not serve its old listeners"
    # once per stream: a stream the server closed for its age meanwhile is sent the current (bad) version anew
    streams = 1 + _stat(lab, web, XDS_CONNECTIONS) - connections
    rejections = _stat(lab, web, LDS_REJECTED) - rejected
    assert rejections == streams, \
        f"web's Envoy rejected LDS {rejections} times on {streams} ADS stream(s): the bad version was sent again"
    text = run_mesh("status", str(xds.inventory), timeout=300).stdout
    assert "ADS NACKed: LDS" in text, f"`mesh status` shows no NACKed LDS (web on vm1):\n{text}"
    lines = _nack_lines(lab, since, web.node_id)
    # reported once per controller that streamed to it, however often Envoy reopened its stream there
    assert all(len(found) <= 1 for found in lines.values()) and 1 <= sum(len(found) for found in lines.values()), \
        f"the controllers' NACK lines of {web.node_id} ({streams} stream(s)): {lines}"

    for host in CONTROLLERS:
        out(lab, host, f"rm -f {XDS_TEST_HOOK}")
    _drain(xds)  # the next push carries web's valid listeners again
    _wait_for_api_hosts(lab, DOCK1_ONLY, "a drain reaching web's Envoy on vm1 once the hook is gone")
    wait_for(lambda: _lds_states(xds, web),
             lambda found: bool(found) and all(item.get("state") == "synced" for item in found),
             f"`mesh status --json` showing {web.node_id}'s LDS synced once the hook is gone", timeout=PUSH_WAIT,
             interval=3.0)
    _drain(xds, undo=True)
    _wait_for_api_hosts(lab, BOTH, "the drain's undo reaching web's Envoy on vm1")


# ---- a controller killed -----------------------------------------------------------------------------------------

def _streams(xds: Xds) -> dict[str, dict[str, int]]:
    """host/proxy -> controller address -> its active ADS connections."""
    return {f"{p.host}/{p.proxy}": xds_connections(xds.lab, p) for p in xds.proxies}


def _host_of(lab: LabUp, address: str) -> str:
    return next(host for host, known in lab.hosts.items() if known == address)


def test_a_killed_controller_fails_no_request_and_a_change_after_it_reaches_every_proxy(xds: Xds) -> None:
    lab = xds.lab
    web = xds.proxy("vm1", "web")
    _wait_for_api_hosts(lab, BOTH, "web's Envoy on vm1 sending to both api instances")
    held = wait_for(lambda: xds_connections(lab, web), lambda seen: sum(seen.values()) == 1,
                    "web's Envoy on vm1 streaming from one controller", timeout=PUSH_WAIT)
    killed = _host_of(lab, next(address for address, count in held.items() if count))
    survivor = next(host for host in CONTROLLERS if host != killed)
    print(f"web's ADS stream is at {killed}; every stream: {_streams(xds)}")
    with traffic(lab) as trace:
        out(lab, killed, f"mkdir -p {Path(NO_RESTART_DROPIN).parent} && printf '[Service]\\nRestart=no\\n' > "
                         f"{NO_RESTART_DROPIN} && systemctl daemon-reload")
        out(lab, killed, f"systemctl kill -s KILL {CONTROLLER_UNIT}")
        killed_at = time.monotonic()
        survivor_address = lab.hosts[survivor]
        wait_for(lambda: _streams(xds),
                 lambda seen: all(found.get(survivor_address, 0) >= 1 and sum(found.values()) == 1
                                  for found in seen.values()),
                 f"every proxy streaming from {survivor} after {killed} was killed", timeout=PUSH_WAIT, interval=1.0)
        print(f"every proxy streaming from {survivor} {time.monotonic() - killed_at:.1f} s after {killed} was killed")
        _drain(xds)
        _wait_for_api_hosts(lab, DOCK1_ONLY, f"a drain made after {killed} was killed reaching web's Envoy on vm1")
        _drain(xds, undo=True)
        _wait_for_api_hosts(lab, BOTH, "the drain's undo reaching web's Envoy on vm1")
    _assert_no_failed_request(trace.requests)

    def not_synced() -> dict[str, Any]:
        report = status_json(xds.inventory)
        shown = {p.node_id: proxy_status(report, p.host, p.proxy).get("xds") or {} for p in xds.proxies}
        return {node: (found.get("state"), found.get("controller")) for node, found in shown.items()
                if found.get("state") != "synced" or not str(found.get("controller")).startswith(f"{survivor}:")}

    wait_for(not_synced, lambda found: not found, f"every proxy's stream synced at {survivor} in `mesh status --json`",
             timeout=PUSH_WAIT, interval=3.0)


# ---- every controller down, vm1 rebooted ---------------------------------------------------------------------------

def test_vm1_rebooted_with_every_controller_down_serves_from_files_and_returns_to_ads(xds: Xds) -> None:
    lab = xds.lab
    web = xds.proxy("vm1", "web")
    _wait_for_api_hosts(lab, BOTH, "web's Envoy on vm1 sending to both api instances")
    for host in CONTROLLERS:
        out(lab, host, f"systemctl stop {CONTROLLER_UNIT}")
    boot = _boot_id(lab, "vm1")
    sh(lab, "vm1", "systemctl reboot", timeout=30)
    wait_for(lambda: _boot_id(lab, "vm1"), lambda seen: seen not in ("", boot), "vm1 back from its reboot",
             timeout=240, interval=2.0)
    wait_for(lambda: hops(lab, "vm1", 8080), chain_ok,
             "web on vm1 serving web -> api -> db after its reboot with every controller down", timeout=120)
    _wait_for_api_hosts(lab, BOTH, "web's Envoy on vm1 with its last endpoints after the reboot", timeout=30)
    seen = delivery_seen(lab, web)
    assert seen.marker == "files" and seen.on_files(), f"web's Envoy on vm1 after the reboot: {seen}"

    for host in CONTROLLERS:
        out(lab, host, f"systemctl start {CONTROLLER_UNIT}")
    started = time.monotonic()
    back = wait_for(lambda: delivery_seen(lab, web), lambda found: found.on_ads(),
                    "web's Envoy on vm1 back on ADS once the controllers started", timeout=BACK_ON_ADS_WAIT,
                    interval=3.0)
    print(f"web's Envoy on vm1 back on ADS {time.monotonic() - started:.1f} s after the controllers started: {back}")
    wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "web -> api -> db with web back on ADS", timeout=60)
    _drain(xds)
    _wait_for_api_hosts(lab, DOCK1_ONLY, "a drain made once vm1 is back on ADS reaching web's Envoy on vm1")
    _drain(xds, undo=True)
    _wait_for_api_hosts(lab, BOTH, "the drain's undo reaching web's Envoy on vm1")
