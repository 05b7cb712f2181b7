"""XdsServer on loopback with real gRPC clients (no Envoy): the node id must be a DNS SAN of the client's
certificate (PERMISSION_DENIED otherwise, logged once a minute per peer), an unknown node gets NOT_FOUND, a foreign
CA is refused at TLS until the bundle file holds it, a renewed serving certificate is served to new connections
(both with no restart of the controller: a new grpc server on the port, the old one's streams go on for the grace
and their clients reconnect to versions they hold), 300 proxies connecting at once are all answered, delta xDS is
UNIMPLEMENTED, pushes are debounced, responses carry the resources' bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from structlog.testing import capture_logs

from mesh.errors import MeshError
from mesh.render import CLUSTER_TYPE, LISTENER_TYPE
from mesh.traces.serving import ServingCert
from mesh.xds.resources import ProxyResources, assembled
from mesh.xds.server import XdsServer
from tests.xds_samples import AdsClient, FixedCert, Leaf, LeafSigner

TRUST_DOMAIN = "loop.mesh"
NODE = "web-vm1-8080"
SPIFFE = f"spiffe://{TRUST_DOMAIN}/svc/web"
TLS_CHECK_S = 0.1  # mesh checks every 10 s
SWAP_GRACE_S = 1.5  # mesh gives 30 s


def resources(node: str = NODE, tag: bytes = b"") -> ProxyResources:
    items = [(LISTENER_TYPE, "inbound", any_pb2.Any(type_url=LISTENER_TYPE, value=b"inbound" + tag).SerializeToString()),
             (CLUSTER_TYPE, "api", any_pb2.Any(type_url=CLUSTER_TYPE, value=b"api" + tag).SerializeToString())]
    return assembled(node, [(url, name, data, hashlib.sha256(data).hexdigest()) for url, name, data in items])


@pytest.fixture
def mesh_ca() -> LeafSigner:
    return LeafSigner.foreign("mesh-root")


@pytest.fixture
def server(tmp_path: Path, mesh_ca: LeafSigner) -> Iterator[XdsServer]:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(mesh_ca.root_pem)
    xds = XdsServer(0, FixedCert(mesh_ca.serving_cert(TRUST_DOMAIN)), str(bundle), TRUST_DOMAIN, host="127.0.0.1",
                    tls_check_s=TLS_CHECK_S, tls_swap_grace_s=SWAP_GRACE_S)
    xds.update({NODE: resources()})
    xds.start()
    assert xds.serving
    try:
        yield xds
    finally:
        xds.stop()


def client(server: XdsServer, ca: LeafSigner, leaf: Leaf, root_pem: bytes | None = None) -> AdsClient:
    return AdsClient(server.port, root_pem or ca.root_pem, leaf, TRUST_DOMAIN)


def refused_with(ads: AdsClient, node: str = NODE) -> grpc.StatusCode:
    ads.send(LISTENER_TYPE, node)
    with pytest.raises(grpc.RpcError) as raised:
        ads.receive()
    ads.close()
    return raised.value.code()  # type: ignore[no-any-return, attr-defined]


def test_a_proxy_gets_its_own_resources_and_its_ack_shows_synced(server: XdsServer, mesh_ca: LeafSigner) -> None:
    ads = client(server, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)))
    ads.send(LISTENER_TYPE, NODE)
    response = ads.receive()
    assert (response.type_url, response.version_info, response.nonce) == (
        LISTENER_TYPE, resources().versions[LISTENER_TYPE], "1")
    assert [item.SerializeToString() for item in response.resources] == [resources().by_type[LISTENER_TYPE]["inbound"]]
    [stream] = server.status().values()
    assert stream.node_id == NODE and stream.peer.startswith("ipv4:127.0.0.1:")
    assert [(item.type, item.state) for item in stream.types] == [("LDS", "stale")]
    ads.send(LISTENER_TYPE, version=response.version_info, nonce=response.nonce)
    deadline = time.monotonic() + 5
    while server.status()[NODE].types[0].state != "synced" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.status()[NODE].types[0].state == "synced"
    ads.close()


def test_a_certificate_that_does_not_name_the_node_is_refused_and_logged_once(server: XdsServer,
                                                                               mesh_ca: LeafSigner) -> None:
    with capture_logs() as logs:
        assert refused_with(client(server, mesh_ca, mesh_ca.issue(SPIFFE, ("api-vm2-9090",)))) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert refused_with(client(server, mesh_ca, mesh_ca.issue(SPIFFE))) == grpc.StatusCode.PERMISSION_DENIED
        assert refused_with(client(server, mesh_ca, mesh_ca.issue("spiffe://other.mesh/svc/web", (NODE,)))) \
            == grpc.StatusCode.PERMISSION_DENIED
    refusals = [entry for entry in logs if entry["event"] == "xds_stream_refused"]
    assert len(refusals) == 1 and "does not name node 'web-vm1-8080'" in refusals[0]["reason"]
    assert server.status() == {}


def test_a_node_the_server_has_no_resources_for_gets_not_found(server: XdsServer, mesh_ca: LeafSigner) -> None:
    assert refused_with(client(server, mesh_ca, mesh_ca.issue(SPIFFE, ("new-vm9-1",))), "new-vm9-1") \
        == grpc.StatusCode.NOT_FOUND


def answered(server: XdsServer, ca: LeafSigner, leaf: Leaf) -> bool:
    ads = client(server, ca, leaf)
    ads.send(LISTENER_TYPE, NODE)
    try:
        return ads.receive().type_url == LISTENER_TYPE
    except grpc.RpcError:
        return False
    finally:
        ads.close()


def test_a_foreign_ca_is_refused_at_tls_until_the_bundle_file_holds_it(server: XdsServer, mesh_ca: LeafSigner,
                                                                       tmp_path: Path) -> None:
    foreign = LeafSigner.foreign()
    leaf = foreign.issue(SPIFFE, (NODE,))
    assert refused_with(client(server, mesh_ca, leaf)) == grpc.StatusCode.UNAVAILABLE
    time.sleep(3 * TLS_CHECK_S)
    assert not answered(server, mesh_ca, leaf)  # checks that found nothing new changed nothing
    (tmp_path / "bundle.new").write_bytes(mesh_ca.root_pem + foreign.root_pem)
    with capture_logs() as logs:
        (tmp_path / "bundle.new").replace(tmp_path / "bundle.pem")  # a CA rotation's new bundle
        deadline = time.monotonic() + 5
        while not answered(server, mesh_ca, leaf):
            assert time.monotonic() < deadline, "the new bundle was not taken"
            time.sleep(0.05)
    assert [entry["event"] for entry in logs if entry["event"].startswith("xds_server")] == ["xds_server_tls_renewed"]
    assert answered(server, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)))


def test_a_bundle_with_no_certificate_is_logged_once_and_the_current_one_kept(server: XdsServer, mesh_ca: LeafSigner,
                                                                             tmp_path: Path) -> None:
    with capture_logs() as logs:
        (tmp_path / "bundle.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")  # cut short
        time.sleep(10 * TLS_CHECK_S)
        assert answered(server, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)))
    assert [entry["event"] for entry in logs if entry["event"].startswith("xds_server")] == [
        "xds_server_tls_not_renewed"]


def served_certificate(port: int, ca: LeafSigner, leaf: Leaf, folder: Path) -> x509.Certificate:
    (folder / "c.pem").write_bytes(leaf.chain_pem)
    (folder / "k.pem").write_bytes(leaf.key_pem)
    context = ssl.create_default_context(cadata=ca.root_pem.decode())
    context.load_cert_chain(folder / "c.pem", folder / "k.pem")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=f"controller.{TRUST_DOMAIN}") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def renewed(server: XdsServer, ca: LeafSigner, folder: Path) -> x509.Certificate:
    """Renew the serving certificate; the one a new connection gets once the server took it."""
    source = server.cert_source
    assert isinstance(source, FixedCert)
    source.cert = ca.serving_cert(TRUST_DOMAIN)
    expected = x509.load_pem_x509_certificates(source.cert.chain_pem)[0]
    leaf = ca.issue(SPIFFE, (NODE,))
    deadline = time.monotonic() + 5
    while True:
        try:
            served = served_certificate(server.port, ca, leaf, folder)
        except ConnectionResetError:  # a handshake the old server had begun when it stopped: a client retries
            served = None
        if served == expected:
            return served
        assert time.monotonic() < deadline, "the renewed certificate was not served"
        time.sleep(0.05)


def test_a_renewed_serving_certificate_is_served_to_new_connections(server: XdsServer, mesh_ca: LeafSigner,
                                                                    tmp_path: Path) -> None:
    before = served_certificate(server.port, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)), tmp_path)
    after = renewed(server, mesh_ca, tmp_path)
    assert before.serial_number != after.serial_number
    assert answered(server, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)))


def test_an_open_stream_outlives_a_renewal_by_the_grace_and_its_reconnect_gets_nothing_it_holds(
        server: XdsServer, mesh_ca: LeafSigner, tmp_path: Path) -> None:
    leaf = mesh_ca.issue(SPIFFE, (NODE,))
    ads = client(server, mesh_ca, leaf)
    ads.send(LISTENER_TYPE, NODE)
    first = ads.receive()
    ads.send(LISTENER_TYPE, version=first.version_info, nonce=first.nonce)
    connected_since = server.status()[NODE].connected_since
    renewed(server, mesh_ca, tmp_path)
    swapped = time.monotonic()
    server.update({NODE: resources(tag=b"2")})  # the open stream still gets pushes in the grace
    pushed = ads.receive()
    assert pushed.version_info == resources(tag=b"2").versions[LISTENER_TYPE] != first.version_info
    ads.send(LISTENER_TYPE, version=pushed.version_info, nonce=pushed.nonce)
    deadline = time.monotonic() + 5
    while server.status()[NODE].types[0].state != "synced":
        assert time.monotonic() < deadline, "the ACK in the grace was not seen"
        time.sleep(0.02)
    assert server.status()[NODE].connected_since == connected_since  # the same stream, shown throughout
    with pytest.raises(grpc.RpcError):
        ads.receive()  # the grace ended: the proxy reconnects
    assert time.monotonic() - swapped < SWAP_GRACE_S + 20
    ads.close()
    again = client(server, mesh_ca, leaf)
    again.send(LISTENER_TYPE, NODE, version=pushed.version_info)  # Envoy resends the version it holds
    deadline = time.monotonic() + 5
    while (shown := server.status().get(NODE)) is None or shown.connected_since == connected_since:
        assert time.monotonic() < deadline, "the reconnected stream is not shown"
        time.sleep(0.02)
    [listeners] = shown.types
    assert (listeners.state, listeners.sent, listeners.acked, listeners.responses) == (
        "synced", pushed.version_info, pushed.version_info, 0)
    server.update({NODE: resources(tag=b"3")})  # nothing was resent: the next response is the next change
    assert again.receive().version_info == resources(tag=b"3").versions[LISTENER_TYPE]
    again.close()


class FreshCopies:
    """A CertSource that gives the same certificate in a new object, with new dates, at each call."""

    def __init__(self, cert: ServingCert) -> None:
        self.cert = cert

    def current(self) -> ServingCert:
        return dataclasses.replace(self.cert, issued_at=datetime.now(UTC))


def test_the_same_certificate_and_bundle_keep_the_server_and_its_streams(tmp_path: Path, mesh_ca: LeafSigner) -> None:
    (tmp_path / "bundle.pem").write_bytes(mesh_ca.root_pem)
    xds = XdsServer(0, FreshCopies(mesh_ca.serving_cert(TRUST_DOMAIN)), str(tmp_path / "bundle.pem"), TRUST_DOMAIN,
                    host="127.0.0.1", tls_check_s=TLS_CHECK_S, tls_swap_grace_s=0.2)
    xds.update({NODE: resources()})
    with capture_logs() as logs:
        xds.start()
        try:
            ads = client(xds, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)))
            ads.send(LISTENER_TYPE, NODE)
            ads.receive()
            time.sleep(10 * TLS_CHECK_S)
            (tmp_path / "bundle.pem").write_bytes(mesh_ca.root_pem)  # written again, the same content
            time.sleep(5 * TLS_CHECK_S)
            xds.update({NODE: resources(tag=b"2")})
            assert ads.receive().version_info == resources(tag=b"2").versions[LISTENER_TYPE]  # still open
            ads.close()
        finally:
            xds.stop()
    assert [entry["event"] for entry in logs if entry["event"] == "xds_server_tls_renewed"] == []


STORM = 300


def test_hundreds_of_proxies_connecting_at_once_are_all_answered(tmp_path: Path, mesh_ca: LeafSigner) -> None:
    """A controller restart or the maximum connection age: every proxy's TLS handshake at once (grpc's dynamic
    server credentials aborted the process at a few hundred)."""
    (tmp_path / "bundle.pem").write_bytes(mesh_ca.root_pem)
    nodes = [f"web-vm{index}-8080" for index in range(STORM)]
    xds = XdsServer(0, FixedCert(mesh_ca.serving_cert(TRUST_DOMAIN)), str(tmp_path / "bundle.pem"), TRUST_DOMAIN,
                    host="127.0.0.1")
    xds.update({node: resources(node) for node in nodes})
    xds.start()
    try:
        leaves = {node: mesh_ca.issue(SPIFFE, (node,)) for node in nodes}
        spec = {"port": xds.port, "root_pem": mesh_ca.root_pem.decode(), "server_name": f"controller.{TRUST_DOMAIN}",
                "clients": [{"node_id": node, "key_pem": leaf.key_pem.decode(), "chain_pem": leaf.chain_pem.decode()}
                            for node, leaf in leaves.items()]}
        (tmp_path / "storm.json").write_text(json.dumps(spec))
        (tmp_path / "storm.json").chmod(0o600)
        root = Path(__file__).resolve().parents[2]
        child = subprocess.run([sys.executable, "-m", "tests.xds_storm", str(tmp_path / "storm.json")], cwd=root,
                               check=False,
                               capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": str(root), "GRPC_VERBOSITY": "ERROR"})
        assert child.returncode == 0, child.stderr[-2000:]
        result = json.loads(child.stdout.splitlines()[-1])
        assert (result["answered"], result["errors"]) == (STORM, [])
        assert xds.serving
        ads = client(xds, mesh_ca, mesh_ca.issue(SPIFFE, (nodes[-1],)))  # still serving after the storm
        ads.send(LISTENER_TYPE, nodes[-1])
        assert ads.receive().version_info == resources(nodes[-1]).versions[LISTENER_TYPE]
        ads.close()
    finally:
        xds.stop()


def test_delta_xds_is_unimplemented(server: XdsServer, mesh_ca: LeafSigner) -> None:
    leaf = mesh_ca.issue(SPIFFE, (NODE,))
    credentials = grpc.ssl_channel_credentials(mesh_ca.root_pem, leaf.key_pem, leaf.chain_pem)
    with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials,
                             options=[("grpc.ssl_target_name_override", f"controller.{TRUST_DOMAIN}")]) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        calls = stub.DeltaAggregatedResources(iter([discovery_pb2.DeltaDiscoveryRequest(type_url=LISTENER_TYPE)]),
                                              timeout=10)
        with pytest.raises(grpc.RpcError) as raised:
            next(calls)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_pushes_are_debounced_and_a_node_that_leaves_is_ended(server: XdsServer, mesh_ca: LeafSigner) -> None:
    ads = client(server, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)))
    ads.send(LISTENER_TYPE, NODE)
    first = ads.receive()
    ads.send(LISTENER_TYPE, version=first.version_info, nonce=first.nonce)
    for index in range(5):  # within debounce_s: one push, of the last
        server.update({NODE: resources(tag=bytes([index]))})
    pushed = ads.receive()
    assert pushed.version_info == resources(tag=b"\x04").versions[LISTENER_TYPE]
    ads.send(LISTENER_TYPE, version=pushed.version_info, nonce=pushed.nonce)
    time.sleep(0.3)
    assert server.status()[NODE].types[0].responses == 2
    server.update({})
    with pytest.raises(grpc.RpcError) as raised:
        ads.receive()
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    ads.close()


def test_a_connection_older_than_the_maximum_age_is_closed(tmp_path: Path, mesh_ca: LeafSigner) -> None:
    (tmp_path / "bundle.pem").write_bytes(mesh_ca.root_pem)
    xds = XdsServer(0, FixedCert(mesh_ca.serving_cert(TRUST_DOMAIN)), str(tmp_path / "bundle.pem"), TRUST_DOMAIN,
                    host="127.0.0.1", max_connection_age_s=0.5, max_connection_age_grace_s=0.5)
    xds.update({NODE: resources()})
    xds.start()
    try:
        ads = client(xds, mesh_ca, mesh_ca.issue(SPIFFE, (NODE,)))
        ads.send(LISTENER_TYPE, NODE)
        ads.receive()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            ads.receive()  # the proxy would reconnect, maybe to another controller
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert time.monotonic() - started < 5
        ads.close()
    finally:
        xds.stop()


class _NoCert:
    def current(self) -> object:
        raise MeshError("the controllers' intermediate is missing")


def test_a_port_taken_or_no_certificate_is_logged_and_not_served(tmp_path: Path, mesh_ca: LeafSigner) -> None:
    (tmp_path / "bundle.pem").write_bytes(mesh_ca.root_pem)
    with socket.socket() as taken, capture_logs() as logs:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = XdsServer(taken.getsockname()[1], FixedCert(mesh_ca.serving_cert(TRUST_DOMAIN)),
                         str(tmp_path / "bundle.pem"), TRUST_DOMAIN, host="127.0.0.1")
        busy.start()
        assert not busy.serving
        busy.stop()
        uncertain = XdsServer(0, _NoCert(), str(tmp_path / "bundle.pem"), TRUST_DOMAIN,  # type: ignore[arg-type]
                              host="127.0.0.1")
        uncertain.start()
        assert not uncertain.serving
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == [
        "xds_server_cannot_listen", "xds_server_no_tls"]


def test_the_same_nack_on_a_reopened_stream_is_logged_once(server: XdsServer, mesh_ca: LeafSigner) -> None:
    """Envoy reopens its stream (a reset, another controller's restart) and refuses the same version again: the
    controller reports that refusal once, and a refusal of a new version again."""
    leaf = mesh_ca.issue(SPIFFE, (NODE,))

    def refuse_once(expected_version: str) -> None:
        ads = client(server, mesh_ca, leaf)
        ads.send(LISTENER_TYPE, NODE)
        response = ads.receive()
        assert response.version_info == expected_version
        ads.send(LISTENER_TYPE, nonce=response.nonce, error="bad listener")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                item.state == "nacked" for stream in server.status().values() for item in stream.types):
            time.sleep(0.02)
        ads.close()
        deadline = time.monotonic() + 5
        while server.status() and time.monotonic() < deadline:
            time.sleep(0.02)

    with capture_logs() as logs:
        refuse_once(resources().versions[LISTENER_TYPE])
        refuse_once(resources().versions[LISTENER_TYPE])
        server.update({NODE: resources(tag=b"-2")})
        time.sleep(0.5)  # pushes are debounced (50 ms)
        refuse_once(resources(tag=b"-2").versions[LISTENER_TYPE])
    nacks = [entry["version"] for entry in logs if entry["event"] == "xds_nacked"]
    assert nacks == [resources().versions[LISTENER_TYPE], resources(tag=b"-2").versions[LISTENER_TYPE]]
