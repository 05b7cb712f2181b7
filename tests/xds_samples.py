"""What the ADS server's tests share: leaves with a node id DNS SAN signed by a CA made here (mesh's own CA, or a
foreign one), a fixed serving certificate, an ADS bootstrap for a laid-out proxy folder, and a gRPC client that
speaks ADS as Envoy does."""

from __future__ import annotations

import datetime
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mesh.config.xds import XDS_CLUSTER, ads_source
from mesh.inventory.model import controller_spiffe_id
from mesh.traces.serving import ServingCert

HOUR = datetime.timedelta(hours=1)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Leaf:
    chain_pem: bytes  # leaf, then the intermediate
    key_pem: bytes
    not_after: datetime.datetime


class LeafSigner:
    """Signs leaves with an issuing CA: mesh's intermediate (from a state dir mesh.pki made) or a self-made root."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, root_pem: bytes) -> None:
        self.cert, self.key, self.root_pem = cert, key, root_pem

    @classmethod
    def of_mesh(cls, state_dir: Path) -> LeafSigner:
        ca = state_dir / "ca"
        key = serialization.load_pem_private_key((ca / "intermediate.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(x509.load_pem_x509_certificate((ca / "intermediate.pem").read_bytes()), key,
                   (ca / "root.pem").read_bytes())

    @classmethod
    def foreign(cls, name: str = "foreign") -> LeafSigner:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        root = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - HOUR).not_valid_after(now + HOUR)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(root, key, _pem(root))

    def issue(self, spiffe_id: str, dns_names: tuple[str, ...] = ()) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        names += [x509.DNSName(name) for name in dns_names]
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.rsplit("/", 1)[-1])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - HOUR).not_valid_after(now + HOUR)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(self.key, hashes.SHA256()))
        chain = _pem(leaf) + (b"" if self.cert.issuer == self.cert.subject else _pem(self.cert))
        return Leaf(chain, _key_pem(key), now + HOUR)

    def serving_cert(self, trust_domain: str) -> ServingCert:
        """A controller's serving certificate (its SPIFFE ID and the SNI name proxies send)."""
        leaf = self.issue(controller_spiffe_id(trust_domain), (f"controller.{trust_domain}",))
        now = datetime.datetime.now(datetime.UTC)
        return ServingCert(leaf.chain_pem, leaf.key_pem, "1", now, leaf.not_after)


class FixedCert:
    """A CertSource that always gives one certificate (the tests swap `cert` to renew)."""

    def __init__(self, cert: ServingCert) -> None:
        self.cert = cert

    def current(self) -> ServingCert:
        return self.cert


def ads_bootstrap(files_bootstrap: str, xds_port: int | tuple[int, ...], trust_domain: str,
                  certificate_sds_path: str, ca_path: str) -> dict[str, Any]:
    """The files bootstrap of a proxy with its resources from ADS instead: node, admin and the rest kept, the
    `mesh-xds` cluster at 127.0.0.1:<each of xds_port> over HTTP/2 and mTLS (the proxy's certificate from its SDS
    file, the controller checked against ca_path by SNI and SPIFFE ID)."""
    ports = xds_port if isinstance(xds_port, tuple) else (xds_port,)
    config = yaml.safe_load(files_bootstrap)
    config["dynamic_resources"] = {
        "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
                       "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]},
        "lds_config": ads_source(), "cds_config": ads_source()}
    config["static_resources"] = {"clusters": [{
        "name": XDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
            for port in ports]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": f"controller.{trust_domain}",
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": "proxy-cert", "sds_config": {
                    "resource_api_version": "V3", "path_config_source": {"path": certificate_sds_path}}}],
                "validation_context": {
                    "trusted_ca": {"filename": ca_path},
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                        "exact": controller_spiffe_id(trust_domain)}}]}}}}}]}
    return dict(config)


class AdsClient:
    """A blocking ADS client (grpc, not aio) for tests: send requests, read responses, see the end status."""

    def __init__(self, port: int, root_pem: bytes, leaf: Leaf, trust_domain: str) -> None:
        credentials = grpc.ssl_channel_credentials(root_pem, leaf.key_pem, leaf.chain_pem)
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}", credentials,
            options=[("grpc.ssl_target_name_override", f"controller.{trust_domain}")])
        self.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._requests: list[discovery_pb2.DiscoveryRequest] = []
        self._queue: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self.responses = self.stub.StreamAggregatedResources(iter(self._queue.get, None), timeout=30)

    def send(self, type_url: str, node_id: str = "", version: str = "", nonce: str = "",
             names: tuple[str, ...] = (), error: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce,
                                                 resource_names=list(names))
        if node_id:
            request.node.id = node_id
        if error is not None:
            request.error_detail.code = 3
            request.error_detail.message = error
        self._queue.put(request)

    def receive(self) -> discovery_pb2.DiscoveryResponse:
        return next(self.responses)

    def close(self) -> None:
        self._queue.put(None)
        self.channel.close()

