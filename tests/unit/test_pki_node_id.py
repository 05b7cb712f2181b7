"""A proxy's leaf names its node id in a DNS SAN beside its SPIFFE ID (the ADS server checks a stream's node id
against it): signed so by the deploy's CA and by a controller's renewal, read back by leaf_dns_names, and a
deploy re-issues a leaf that lacks it. The checker's leaf carries none."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_ca_byo import NOW as BYO_NOW
from test_ca_byo import check, key_pem, owner, pem
from test_plan_changes import TD as PLAN_TD
from test_plan_changes import _plan, converged

from mesh.controller.protocol import CertState
from mesh.controller.renewal import Renewer
from mesh.controller.rotation import SignedLeaf, Signer
from mesh.controller.spec import ControllerSpec, HostSpec, IdentitySpec
from mesh.deploy.steps.identity import certificate_reason, checker_identity, proxy_identity
from mesh.errors import MeshError
from mesh.hosts.observe import CertificateFact
from mesh.inventory.model import health_checker_spiffe_id, spiffe_id
from mesh.pki import CertificateAuthority, leaf_dns_names, leaf_info
from mesh.pki.byo import GivenCAError, check_given_ca
from mesh.pki.certs import (
    Issuer,
    LeafRequest,
    build_intermediate,
    build_leaf,
    build_root,
    checked_csr,
    new_ca_key,
)
from mesh.plan.changes import certificate_reason_for, host_changes

TD = "lab.mesh"
WEB = spiffe_id(TD, "web")
NODE = "web-vm1-8080"
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
TTL = timedelta(hours=2)


def key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, request.public_bytes(serialization.Encoding.PEM)


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def san_values(cert_pem: bytes) -> list[tuple[str, str]]:
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [(type(name).__name__, str(name.value)) for name in names]


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.ensure(str(tmp_path / "state"), TD)[0]


def test_build_leaf_puts_the_node_id_beside_the_spiffe_id() -> None:
    root_key = new_ca_key()
    root = build_root(root_key, TD, NOW)
    _, csr = key_and_csr()
    request = LeafRequest(checked_csr(csr), WEB, "web", NOW, NOW + TTL, dns_names=(NODE,))
    leaf = build_leaf(request, Issuer(root, root_key)).public_bytes(serialization.Encoding.PEM)
    assert san_values(leaf) == [("UniformResourceIdentifier", WEB), ("DNSName", NODE)]
    assert leaf_dns_names(leaf) == (NODE,)
    assert (leaf_info(leaf).spiffe_id, leaf_info(leaf).dns_names) == (WEB, (NODE,))  # the SPIFFE ID as before


def test_a_leaf_without_dns_names_has_only_its_uri() -> None:
    root_key = new_ca_key()
    root = build_root(root_key, TD, NOW)
    _, csr = key_and_csr()
    leaf = build_leaf(LeafRequest(checked_csr(csr), WEB, "web", NOW, NOW + TTL), Issuer(root, root_key))
    pem = leaf.public_bytes(serialization.Encoding.PEM)
    assert san_values(pem) == [("UniformResourceIdentifier", WEB)]
    assert leaf_dns_names(pem) == ()


@pytest.mark.parametrize("name", ["", "web vm1", "wéb-vm1", "a" * 1025, "web\nvm1", "web/vm1", "web\x00vm1"])
def test_a_name_that_is_no_dns_name_is_refused(name: str) -> None:
    root_key = new_ca_key()
    root = build_root(root_key, TD, NOW)
    _, csr = key_and_csr()
    with pytest.raises(MeshError, match="cannot be a certificate's DNS name"):
        build_leaf(LeafRequest(checked_csr(csr), WEB, "web", NOW, NOW + TTL, dns_names=(name,)),
                   Issuer(root, root_key))


def test_leaf_dns_names_of_something_unreadable_is_an_error() -> None:
    with pytest.raises(MeshError):
        leaf_dns_names(b"not a certificate")


def test_the_deploys_ca_signs_the_node_id(authority: CertificateAuthority) -> None:
    _, csr = key_and_csr()
    issued = authority.sign(csr, WEB, TTL, "vm1", "web-8080", dns_names=(NODE,))
    assert leaf_dns_names(issued.cert_pem) == (NODE,)
    assert leaf_dns_names(issued.chain_pem) == (NODE,)
    checker = authority.sign(key_and_csr()[1], health_checker_spiffe_id(TD), TTL, "ctl1", "health-checker")
    assert leaf_dns_names(checker.cert_pem) == ()


def controller_signer() -> Signer:
    root_key, key = new_ca_key(), new_ca_key()
    root = build_root(root_key, TD, NOW)
    intermediate = build_intermediate(Issuer(root, root_key), key, TD, NOW)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Signer(TD, intermediate, key)


def test_the_controllers_signer_signs_the_node_id() -> None:
    _, csr = key_and_csr()
    leaf = controller_signer().sign(csr, WEB, TTL, NOW, dns_names=(NODE,))
    assert san_values(leaf.chain_pem) == [("UniformResourceIdentifier", WEB), ("DNSName", NODE)]
    assert leaf_dns_names(controller_signer().sign(csr, WEB, TTL, NOW).chain_pem) == ()


@dataclass
class SpySigner:
    """Signs as the real Signer does and remembers the DNS names it was asked for."""

    signer: Signer
    asked: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def sign(self, csr_pem: bytes, spiffe: str, ttl: timedelta, now: datetime,
             dns_names: tuple[str, ...] = ()) -> SignedLeaf:
        self.asked.append((spiffe, dns_names))
        return self.signer.sign(csr_pem, spiffe, ttl, now, dns_names=dns_names)


@dataclass
class FakeLink:
    """A host answering `csr NAME` with a fresh CSR and `install NAME VERSION` with the leaf's serial."""

    spec: HostSpec
    state: Any
    installed: dict[str, bytes] = field(default_factory=dict)

    def run(self, line: str, stdin: bytes | None = None) -> SimpleNamespace:
        verb, name, *_ = line.split(" ")
        if verb == "csr":
            return SimpleNamespace(exit_code=0, stdout="pending 20261206T120000-abcdef\n" + key_and_csr()[1].decode(),
                                   stderr="")
        assert stdin is not None
        self.installed[name] = stdin
        serial = x509.load_pem_x509_certificates(stdin)[0].serial_number
        return SimpleNamespace(exit_code=0, stdout=f"installed {name} {serial:x}\n", stderr="")


def test_renewal_asks_for_each_proxys_node_id_and_none_for_the_checker() -> None:
    identities = (IdentitySpec("web-8080", "vm", WEB, NODE),
                  IdentitySpec("checker", "checker", health_checker_spiffe_id(TD)))
    host = HostSpec("ctl1", "10.77.0.3", 22, (), identities, ())
    spec = ControllerSpec("lab", TD, "d" * 64, "http://10.77.0.2:8500", None, None, 7200, (host,))
    spy = SpySigner(controller_signer())
    renewer = Renewer(spec, spy, lambda *args: None, now=lambda: NOW)  # type: ignore[arg-type]
    link = FakeLink(host, SimpleNamespace(certs={"web-8080": None, "checker": None}))
    renewer.renew(link, lambda: True)  # type: ignore[arg-type]
    assert spy.asked == [(WEB, (NODE,)), (health_checker_spiffe_id(TD), ())]
    assert leaf_dns_names(link.installed["web-8080"]) == (NODE,)
    assert leaf_dns_names(link.installed["checker"]) == ()
    assert isinstance(link.state.certs["web-8080"], CertState)


def test_a_deploy_reissues_a_proxy_leaf_without_its_node_id(authority: CertificateAuthority) -> None:
    key, csr = key_and_csr()
    old = authority.sign(csr, WEB, TTL, "vm1", "web-8080")  # issued before leaves named their node id
    assert certificate_reason(old.chain_pem, public_pem(key), WEB, authority, TTL) is None  # as before
    assert certificate_reason(old.chain_pem, public_pem(key), WEB, authority, TTL, NODE) == \
        f"without its node id {NODE} as a DNS name"
    new = authority.sign(csr, WEB, TTL, "vm1", "web-8080", dns_names=(NODE,))
    assert certificate_reason(new.chain_pem, public_pem(key), WEB, authority, TTL, NODE) is None
    other = authority.sign(csr, WEB, TTL, "vm2", "web-8080", dns_names=("web-vm2-8080",))
    assert certificate_reason(other.chain_pem, public_pem(key), WEB, authority, TTL, NODE) == \
        f"without its node id {NODE} as a DNS name"


def test_a_proxys_identity_carries_its_node_id_the_checkers_none() -> None:
    assert proxy_identity("web-8080", WEB, node_id=NODE).dns_names == (NODE,)
    assert proxy_identity("web-8080", WEB).dns_names == ()
    assert checker_identity(TD).dns_names == ()


def test_a_brought_ca_whose_dns_constraints_refuse_node_ids_is_refused() -> None:
    only_corp = x509.NameConstraints([x509.UniformResourceIdentifier(TD), x509.DNSName("corp.example")], None)
    with pytest.raises(GivenCAError, match="permits DNS names only under corp.example: it cannot issue proxy "
                                           "leaves, which name their node id"):
        check(owner(constraints=only_corp))
    with pytest.raises(GivenCAError, match="excludes every DNS name"):
        check(owner(constraints=x509.NameConstraints(None, [x509.DNSName("")])))
    check(owner(constraints=x509.NameConstraints([x509.UniformResourceIdentifier(TD)], None)))  # URIs only: fine
    check(owner(constraints=x509.NameConstraints(None, [x509.DNSName("corp.example")])))


def test_a_brought_ca_signs_the_node_id(tmp_path: Path) -> None:
    given = owner()
    checked = check_given_ca(pem(given.intermediate), key_pem(given.key), pem(given.root), TD, BYO_NOW)
    authority = CertificateAuthority.bring(str(tmp_path / "state"), TD, checked)
    issued = authority.sign(key_and_csr()[1], WEB, TTL, "vm1", "web-8080", dns_names=(NODE,))
    assert leaf_dns_names(issued.cert_pem) == (NODE,)


def test_the_plan_renews_a_proxy_leaf_without_its_node_id_and_not_the_checkers(tmp_path: Path) -> None:
    """A host whose leaves predate node ids: mesh plan (and so the deploy, which acts only on hosts with changes)
    renews each proxy's leaf, even where the CA finds nothing wrong with it; a leaf with its node id stays."""
    plan = _plan()["vm1"]
    authority = CertificateAuthority.ensure(str(tmp_path / "state"), PLAN_TD)[0]
    key, csr = key_and_csr()
    old = {proxy.name: authority.sign(csr, proxy.spiffe_id, TTL, "vm1", proxy.name).chain_pem
           for proxy in plan.proxies}
    facts = replace(converged(plan), certificates={name: CertificateFact(name, chain, public_pem(key))
                                                   for name, chain in old.items()})
    reason = certificate_reason_for(authority, TTL)
    renewals = [change.line() for change in host_changes(plan, facts, reason) if change.kind == "certificate"]
    assert renewals == [f"renew certificate {proxy.spiffe_id} (without its node id {proxy.config.node_id} as a "
                        "DNS name)" for proxy in plan.proxies]
    new = {proxy.name: authority.sign(csr, proxy.spiffe_id, TTL, "vm1", proxy.name,
                                      dns_names=(proxy.config.node_id,)).chain_pem for proxy in plan.proxies}
    facts = replace(facts, certificates={name: CertificateFact(name, chain, public_pem(key))
                                         for name, chain in new.items()})
    assert [change for change in host_changes(plan, facts, reason) if change.kind == "certificate"] == []


@pytest.mark.parametrize(("host", "container"), [("vm_1", None), ("web01.example.com", None), ("dock1", "api_v2.1"),
                                                 ("h-" + "a" * 200, "c" * 60)])
def test_the_node_id_of_every_host_and_container_name_the_inventory_accepts_is_signed(
        host: str, container: str | None) -> None:
    """An underscore is valid in an Ansible host name and a Docker container name: the leaf must still be signed
    (a refusal here would stop a deploy halfway through its hosts)."""
    from mesh.inventory.model import Workload
    from mesh.inventory.values import check_container_name, check_host_name

    check_host_name(host)
    if container is not None:
        check_container_name(container)
    workload = Workload(host=host, index=0, service="api", port=9090, trust_domain="lab.mesh", container=container)
    root_key = new_ca_key()
    root = build_root(root_key, TD, NOW)
    _, csr = key_and_csr()
    leaf = build_leaf(LeafRequest(checked_csr(csr), WEB, "web", NOW, NOW + TTL, dns_names=(workload.consul_id,)),
                      Issuer(root, root_key))
    assert leaf_dns_names(leaf.public_bytes(serialization.Encoding.PEM)) == (workload.consul_id,)
