"""The mesh CA: files and modes, chains that cryptography's verifier, `openssl verify` and a real mutual-TLS
handshake accept, leaves that carry only the SPIFFE ID, renewal at half life, and the issued-leaf ledger."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from mesh.errors import MeshError
from mesh.inventory.model import health_checker_spiffe_id, spiffe_id
from mesh.pki import (
    CertificateAuthority,
    IssuedCertificate,
    leaf_info,
    leaf_needs_renewal,
    leaf_remaining_fraction,
)
from mesh.pki.expiry import WARN_REMAINING, Expiry, judge, judge_pem
from mesh.pki.expiry import remaining_text as expiry_remaining_text
from mesh.pki.vcs import HEADER, git_work_tree, key_in_git, protect_keys

TD = "lab.mesh"
WEB = spiffe_id(TD, "web")
TTL = timedelta(hours=24)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def make_csr(key: PrivateKey | None = None, sans: list[x509.GeneralName] | None = None,
             cn: str = "anything") -> tuple[PrivateKey, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return key, builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    """A CLI test run before may have bound structlog to a stderr pytest has closed since: unbind it."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    made, created = CertificateAuthority.ensure(str(tmp_path / "state"), TD)
    assert created
    return made


def issue(authority: CertificateAuthority, spiffe: str = WEB, ttl: timedelta = TTL,
          now: datetime | None = None) -> tuple[PrivateKey, IssuedCertificate]:
    key, csr = make_csr()
    return key, authority.sign(csr, spiffe, ttl, host="vm1", proxy="web-0", now=now)


# --- the CA's files


def test_ensure_creates_once_with_private_modes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first, created = CertificateAuthority.ensure(str(state), TD)
    again, created_again = CertificateAuthority.ensure(str(state), TD)
    assert (created, created_again) == (True, False)
    assert again.root_pem == first.root_pem and again.intermediate_pem == first.intermediate_pem
    ca_dir = state / "ca"
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in ca_dir.iterdir()}
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert modes["root.key"] == modes["intermediate.key"] == 0o600
    assert modes["root.pem"] == modes["intermediate.pem"] == 0o644
    assert not [name for name in os.listdir(state) if name != "ca"]  # no temp folder left behind


def test_keys_are_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        CertificateAuthority.ensure(str(tmp_path), TD)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ca" / "root.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700


def test_ca_certificates_are_what_they_claim(authority: CertificateAuthority) -> None:
    root, intermediate = authority.root, authority.intermediate
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(root.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    root_bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    inter_bc = intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert root_bc.critical and root_bc.value.ca
    assert inter_bc.value.ca and inter_bc.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert timedelta(days=3600) < root.not_valid_after_utc - root.not_valid_before_utc < timedelta(days=3700)
    inter_life = intermediate.not_valid_after_utc - intermediate.not_valid_before_utc
    assert timedelta(days=1800) < inter_life < timedelta(days=1850)
    intermediate.verify_directly_issued_by(root)


def test_another_trust_domain_is_refused(authority: CertificateAuthority) -> None:
    with pytest.raises(MeshError, match="belongs to trust domain 'lab.mesh', not 'other.mesh'"):
        CertificateAuthority.ensure(authority.state_dir, "other.mesh")


def test_load_refuses_absent_ca(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="no mesh CA"):
        CertificateAuthority.load(str(tmp_path))


def test_load_refuses_a_key_others_may_read(authority: CertificateAuthority) -> None:
    os.chmod(os.path.join(authority.ca_dir, "intermediate.key"), 0o644)
    with pytest.raises(MeshError, match="mode 0644: group or others may read it"):
        CertificateAuthority.load(authority.state_dir)


def test_load_refuses_corrupt_and_missing_files(authority: CertificateAuthority) -> None:
    key_path = Path(authority.ca_dir) / "intermediate.key"
    key_path.write_bytes(b"garbage")
    with pytest.raises(MeshError, match="is not a PEM key") as caught:
        CertificateAuthority.load(authority.state_dir)
    assert "garbage" not in str(caught.value)
    (Path(authority.ca_dir) / "root.pem").unlink()
    with pytest.raises(MeshError, match="incomplete"):
        CertificateAuthority.load(authority.state_dir)


def test_load_refuses_an_intermediate_key_of_another_ca(authority: CertificateAuthority, tmp_path: Path) -> None:
    other, _ = CertificateAuthority.ensure(str(tmp_path / "other"), TD)
    foreign = (Path(other.ca_dir) / "intermediate.key").read_bytes()
    (Path(authority.ca_dir) / "intermediate.key").write_bytes(foreign)
    with pytest.raises(MeshError, match="corrupt"):
        CertificateAuthority.load(authority.state_dir)


def test_repr_shows_no_key(authority: CertificateAuthority) -> None:
    assert "_intermediate_key" not in repr(authority) and "PrivateKey" not in repr(authority)


# --- signing


def test_leaf_has_only_the_spiffe_san_whatever_the_csr_asks(authority: CertificateAuthority) -> None:
    _, csr = make_csr(sans=[x509.DNSName("evil.example"), x509.UniformResourceIdentifier("spiffe://evil/x"),
                            x509.RFC822Name("a@b.c")], cn="admin")
    issued = authority.sign(csr, WEB, TTL, host="vm1", proxy="web-0")
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(WEB)]
    assert leaf.subject.rfc4514_string() == "CN=web"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_agreement and not usage.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    inter_ski = authority.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == inter_ski.digest


def test_times_serial_and_chain(authority: CertificateAuthority) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    _, issued = issue(authority, now=now)
    assert issued.not_before == now - timedelta(minutes=5)
    assert issued.not_after == now + TTL
    certs = x509.load_pem_x509_certificates(issued.chain_pem)
    assert [c.serial_number for c in certs] == [int(issued.serial, 16), authority.intermediate.serial_number]
    _, other = issue(authority, now=now)
    assert other.serial != issued.serial
    info = leaf_info(issued.chain_pem)
    assert (info.spiffe_id, info.serial, info.not_after) == (WEB, issued.serial, now + TTL)


def test_foreign_or_malformed_spiffe_ids_are_refused(authority: CertificateAuthority) -> None:
    _, csr = make_csr()
    for bad, message in (("spiffe://other.mesh/svc/web", "outside this CA's trust domain"),
                         ("spiffe://lab.mesh.evil/svc/web", "outside"),
                         ("https://lab.mesh/svc/web", "not a SPIFFE ID"),
                         ("spiffe://lab.mesh", "needs a path"),
                         ("spiffe://lab.mesh/svc/../x", "needs a path"),
                         ("spiffe://lab.mesh/svc/web?x=1", "needs a path")):
        with pytest.raises(MeshError, match=message):
            authority.sign(csr, bad, TTL, host="vm1", proxy="web-0")
    assert authority.issued() == []


def test_health_checker_identity_is_signed(authority: CertificateAuthority) -> None:
    _, issued = issue(authority, spiffe=health_checker_spiffe_id(TD))
    assert leaf_info(issued.cert_pem).spiffe_id == f"spiffe://{TD}/mesh/health"


def test_weak_or_odd_keys_and_forged_csrs_are_refused(authority: CertificateAuthority) -> None:
    for key, message in ((ec.generate_private_key(ec.SECP384R1()), "P-256 only"),
                         (rsa.generate_private_key(65537, 1024), "1024-bit RSA"),
                         (ed25519.Ed25519PrivateKey.generate(), "EC P-256 or RSA")):
        _, csr = make_csr(key)
        with pytest.raises(MeshError, match=message):
            authority.sign(csr, WEB, TTL, host="vm1", proxy="web-0")
    with pytest.raises(MeshError, match="not a PEM CSR"):
        authority.sign(b"nope", WEB, TTL, host="vm1", proxy="web-0")


def test_csr_with_a_bad_signature_is_refused(authority: CertificateAuthority) -> None:
    _, csr = make_csr()
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(MeshError, match="signature does not verify"):
        authority.sign(forged, WEB, TTL, host="vm1", proxy="web-0")


def test_rsa_2048_is_accepted_without_key_agreement(authority: CertificateAuthority) -> None:
    _, csr = make_csr(rsa.generate_private_key(65537, 2048))
    issued = authority.sign(csr, WEB, TTL, host="vm1", proxy="web-0")
    usage = x509.load_pem_x509_certificate(issued.cert_pem).extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.value.digital_signature and not usage.value.key_agreement


# --- verification by other implementations


def test_cryptography_verifier_accepts_the_chain(authority: CertificateAuthority) -> None:
    _, issued = issue(authority)
    leaf, intermediate = x509.load_pem_x509_certificates(issued.chain_pem)
    verifier = PolicyBuilder().store(Store([authority.root])).build_client_verifier()
    verified = verifier.verify(leaf, [intermediate])
    assert verified.subjects is not None
    assert x509.UniformResourceIdentifier(WEB) in verified.subjects
    assert verified.chain[-1] == authority.root


def test_cryptography_verifier_refuses_another_ca(authority: CertificateAuthority, tmp_path: Path) -> None:
    other, _ = CertificateAuthority.ensure(str(tmp_path / "other"), TD)
    _, issued = issue(other)
    leaf, intermediate = x509.load_pem_x509_certificates(issued.chain_pem)
    verifier = PolicyBuilder().store(Store([authority.root])).build_client_verifier()
    with pytest.raises(Exception, match="(?i)candidates|issuer|chain"):
        verifier.verify(leaf, [intermediate])


def test_openssl_verify_accepts_the_chain(authority: CertificateAuthority, tmp_path: Path) -> None:
    _, issued = issue(authority)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(issued.cert_pem)
    ca_dir = Path(authority.ca_dir)
    for purpose in ("sslserver", "sslclient"):
        result = subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca_dir / "root.pem"),
                                 "-untrusted", str(ca_dir / "intermediate.pem"), str(leaf)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(": OK")


def _tls_context(purpose: ssl.Purpose, chain: Path, key: Path, root: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=str(root))
    context.check_hostname = False  # mesh identities are SPIFFE URIs, not host names
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(chain), str(key))
    return context


def _write_identity(tmp_path: Path, name: str, authority: CertificateAuthority, spiffe: str) -> tuple[Path, Path]:
    key, issued = issue(authority, spiffe=spiffe)
    chain, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    chain.write_bytes(issued.chain_pem)
    key_file.write_bytes(key_pem(key))
    return chain, key_file


def test_mutual_tls_handshake_on_loopback(authority: CertificateAuthority, tmp_path: Path) -> None:
    root = Path(authority.ca_dir) / "root.pem"
    server_ctx = _tls_context(ssl.Purpose.CLIENT_AUTH, *_write_identity(tmp_path, "api", authority,
                                                                       spiffe_id(TD, "api")), root)
    client_ctx = _tls_context(ssl.Purpose.SERVER_AUTH, *_write_identity(tmp_path, "web", authority, WEB), root)
    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["client"] = tls.getpeercert()
                tls.sendall(tls.recv(5).upper())

        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw, client_ctx.wrap_socket(raw) as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"HELLO"
            server_cert = tls.getpeercert()
        thread.join(timeout=10)
    assert server_cert and ("URI", spiffe_id(TD, "api")) in server_cert["subjectAltName"]
    client_cert = seen["client"]
    assert isinstance(client_cert, dict) and ("URI", WEB) in client_cert["subjectAltName"]


def test_server_refuses_a_client_without_certificate(authority: CertificateAuthority, tmp_path: Path) -> None:
    root = Path(authority.ca_dir) / "root.pem"
    server_ctx = _tls_context(ssl.Purpose.CLIENT_AUTH, *_write_identity(tmp_path, "api", authority,
                                                                       spiffe_id(TD, "api")), root)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root))
    client_ctx.check_hostname = False
    errors: list[Exception] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        with (pytest.raises((ssl.SSLError, ConnectionError)),
              socket.create_connection(listener.getsockname()) as raw, client_ctx.wrap_socket(raw) as tls):
            tls.sendall(b"x")
            tls.recv(1)
        thread.join(timeout=10)
    assert errors and "certificate" in str(errors[0]).lower()


# --- renewal


def test_renewal_at_forty_and_sixty_percent(authority: CertificateAuthority) -> None:
    _, issued = issue(authority, ttl=timedelta(hours=10))
    lifetime = timedelta(hours=10)  # counted from the signing: not_before is 5 minutes earlier (clock skew)
    at_40 = issued.not_before + timedelta(minutes=5) + lifetime * 0.4
    at_60 = issued.not_before + timedelta(minutes=5) + lifetime * 0.6
    assert leaf_remaining_fraction(issued.chain_pem, at_40) == pytest.approx(0.6)
    assert not leaf_needs_renewal(issued.chain_pem, at_40)
    assert leaf_needs_renewal(issued.chain_pem, at_60)
    assert not leaf_needs_renewal(issued.chain_pem, at_40, root_pem=authority.root_pem)
    assert not authority.needs_renewal(issued.cert_pem, at_40)  # leaf alone: the CA knows its intermediate
    assert authority.needs_renewal(issued.chain_pem, at_60)
    assert leaf_remaining_fraction(issued.chain_pem, issued.not_after + timedelta(days=1)) == 0.0


def test_renewal_of_unreadable_or_foreign_leaves(authority: CertificateAuthority, tmp_path: Path) -> None:
    assert leaf_needs_renewal(b"not a certificate")
    assert leaf_needs_renewal(b"")
    other, _ = CertificateAuthority.ensure(str(tmp_path / "other"), TD)
    _, foreign = issue(other)
    assert not leaf_needs_renewal(foreign.chain_pem)
    assert leaf_needs_renewal(foreign.chain_pem, root_pem=authority.root_pem)
    assert authority.needs_renewal(foreign.chain_pem)
    # a bundle that carries this CA's intermediate does not make a foreign leaf chain to it
    assert authority.needs_renewal(foreign.cert_pem + authority.intermediate_pem)
    with pytest.raises(MeshError):
        leaf_info(b"junk")


# --- the ledger


def test_issued_json_records_each_leaf_and_no_key(authority: CertificateAuthority) -> None:
    key, first = issue(authority)
    authority.sign(make_csr()[1], spiffe_id(TD, "api"), TTL, host="vm2", proxy="api-0")
    records = authority.issued()
    assert [(r.host, r.proxy, r.spiffe_id) for r in records] == [("vm1", "web-0", WEB),
                                                                 ("vm2", "api-0", spiffe_id(TD, "api"))]
    assert records[0].serial == first.serial and records[0].not_after == first.not_after
    text = (Path(authority.ca_dir) / "issued.json").read_text()
    document = json.loads(text)
    assert set(document["issued"][0]) == {"host", "proxy", "spiffe_id", "serial", "not_before", "not_after",
                                          "issued_at"}
    assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text
    assert key_pem(key).decode() not in text


def test_concurrent_signing_loses_no_record(authority: CertificateAuthority) -> None:
    csrs = [make_csr()[1] for _ in range(16)]
    threads = [threading.Thread(target=authority.sign, args=(csr, WEB, TTL, f"vm{i}", "web-0"))
               for i, csr in enumerate(csrs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.host for r in authority.issued()) == sorted(f"vm{i}" for i in range(16))


def test_ttl_must_be_positive(authority: CertificateAuthority) -> None:
    with pytest.raises(MeshError, match="positive"):
        issue(authority, ttl=timedelta(0))


# --- keys kept out of git

def _ignored(repo: Path, path: Path) -> bool:
    return subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(path)], check=False).returncode == 0


def test_a_ca_made_inside_a_git_work_tree_gets_a_gitignore_for_its_keys(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    state = repo / "deploy" / "state"
    CertificateAuthority.ensure(str(state), TD)
    assert (state / ".gitignore").read_text().splitlines()[1:] == ["/ca/*.key", "/ca/**/*.key", "/.ca-*/"]
    assert _ignored(repo, state / "ca" / "root.key") and _ignored(repo, state / "ca" / "intermediate.key")
    assert not _ignored(repo, state / "ca" / "root.pem")  # certificates are public: only keys are ignored
    assert not key_in_git(str(state / "ca" / "root.key"))


def test_an_existing_gitignore_is_extended_not_replaced(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    state = tmp_path / "state"
    state.mkdir()
    (state / ".gitignore").write_text("wheels/\n/ca/*.key")
    CertificateAuthority.ensure(str(state), TD)
    assert (state / ".gitignore").read_text() == f"wheels/\n/ca/*.key\n{HEADER}\n/ca/**/*.key\n/.ca-*/\n"
    assert not protect_keys(str(state))  # nothing left to add


def test_no_gitignore_outside_git(tmp_path: Path) -> None:
    CertificateAuthority.ensure(str(tmp_path / "state"), TD)
    assert not (tmp_path / "state" / ".gitignore").exists()
    assert git_work_tree(str(tmp_path / "state")) is None
    assert not key_in_git(str(tmp_path / "state" / "ca" / "root.key"))


def test_a_committed_key_counts_as_in_git_even_when_ignored_later(tmp_path: Path) -> None:
    repo = tmp_path
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "root.key").write_text("not a real key\n")
    subprocess.run(["git", "-C", str(repo), "add", "root.key"], check=True)
    (repo / ".gitignore").write_text("*.key\n")
    assert key_in_git(str(repo / "root.key"))


# --- remaining lifetime (mesh ca check, mesh status)

def test_expiry_states_at_a_third(authority: CertificateAuthority) -> None:
    _, issued = issue(authority, ttl=timedelta(hours=24))
    cert = x509.load_pem_x509_certificates(issued.cert_pem)[0]
    lifetime = timedelta(hours=24)  # from the signing (not_before is 5 minutes earlier: clock skew)
    just_above = issued.not_after - lifetime / 3 - timedelta(seconds=10)
    just_below = issued.not_after - lifetime / 3 + timedelta(seconds=10)
    assert judge(cert, just_above).state is Expiry.OK
    seen = judge(cert, just_below)
    assert seen.state is Expiry.LOW and seen.fraction < WARN_REMAINING
    assert seen.describe() == f"expires {issued.not_after:%Y-%m-%d %H:%M} UTC, 7h 59m left (33%)"
    assert judge(cert, issued.not_after).state is Expiry.EXPIRED
    assert judge_pem(None).state is Expiry.MISSING and judge_pem(b"garbage").state is Expiry.UNREADABLE
    assert judge_pem(issued.chain_pem, just_below).state is Expiry.LOW  # the leaf of a chain is judged


def test_expiry_remaining_text() -> None:
    assert expiry_remaining_text(timedelta(days=2, hours=3)) == "2d 3h"
    assert expiry_remaining_text(timedelta(minutes=4, seconds=10)) == "4m 10s"
    assert expiry_remaining_text(timedelta(seconds=59)) == "59s"
    assert expiry_remaining_text(timedelta(seconds=-5)) == "0s"
