"""Bringing your own CA (mesh/pki/byo.py, `mesh ca init --intermediate`, `mesh ca rotate start --intermediate`):
what is refused (wrong key, not a CA, expired, not chaining, no room for the controllers' intermediate, name
constraints), what mesh keeps (no root key; keys 0600 in 0700), and how leaves chain through the owner's CA."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mesh.cli import run
from mesh.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from mesh.pki import CertificateAuthority, chains_to
from mesh.pki.byo import GivenCAError, check_given_ca, uri_host_matches
from mesh.pki.phases import begin, finish, switch

TD = "lab.mesh"
NOW = datetime.now(UTC)
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@pytest.fixture(autouse=True)
def _unbound_logs() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert(name: str, key: Key, issuer: tuple[x509.Certificate, Key] | None = None, ca: bool = True,
         path_length: int | None = None, days: int = 365, start: datetime | None = None,
         constraints: x509.NameConstraints | None = None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_name, signer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    start = start or NOW - timedelta(days=1)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(signer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True))
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return builder.sign(signer_key, hashes.SHA256())


@dataclass
class Owner:
    """An organisation's CA: a root (whose key mesh never sees) and an intermediate it hands to mesh."""

    root: x509.Certificate
    root_key: Key
    intermediate: x509.Certificate
    key: Key

    def files(self, folder: Path) -> tuple[str, str, str]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "int.pem").write_bytes(pem(self.intermediate))
        (folder / "int.key").write_bytes(key_pem(self.key))
        (folder / "root.pem").write_bytes(pem(self.root))
        return str(folder / "int.pem"), str(folder / "int.key"), str(folder / "root.pem")


def owner(path_length: int | None = 1, rsa_keys: bool = False, **options: object) -> Owner:
    def new() -> Key:
        return rsa.generate_private_key(65537, 2048) if rsa_keys else ec.generate_private_key(ec.SECP256R1())

    root_key, key = new(), new()
    root = cert("Corp Root", root_key, path_length=None)
    return Owner(root, root_key, cert("Corp Mesh Intermediate", key, (root, root_key), path_length=path_length,
                                      **options), key)  # type: ignore[arg-type]


def check(given: Owner, **overrides: bytes) -> None:
    check_given_ca(overrides.get("intermediate", pem(given.intermediate)), overrides.get("key", key_pem(given.key)),
                   overrides.get("root", pem(given.root)), TD, NOW)


# ---- what is refused ---------------------------------------------------------------------------------------

def test_a_good_intermediate_is_accepted_ec_or_rsa() -> None:
    for rsa_keys in (False, True):
        given = owner(rsa_keys=rsa_keys)
        checked = check_given_ca(pem(given.intermediate), key_pem(given.key), pem(given.root), TD, NOW)
        assert checked.intermediate == given.intermediate and checked.root == given.root
        assert "PrivateKey" not in repr(checked) and "BEGIN" not in repr(checked)


def test_the_wrong_key_is_refused() -> None:
    given, other = owner(), owner()
    with pytest.raises(GivenCAError, match="the key is not the intermediate's") as refused:
        check(given, key=key_pem(other.key))
    assert "BEGIN" not in str(refused.value)


def test_a_certificate_that_is_not_a_ca_is_refused() -> None:
    with pytest.raises(GivenCAError, match=r"the intermediate \(CN=Corp Mesh Intermediate\) is not a CA"):
        check(owner(ca=False))


def test_an_expired_or_not_yet_valid_intermediate_is_refused() -> None:
    with pytest.raises(GivenCAError, match="the intermediate .* expired on"):
        check(owner(days=10, start=NOW - timedelta(days=11)))
    with pytest.raises(GivenCAError, match="is not valid before"):
        check(owner(start=NOW + timedelta(days=2)))


def test_an_intermediate_that_does_not_chain_to_the_root_is_refused() -> None:
    given, stranger = owner(), owner()
    with pytest.raises(GivenCAError, match="is not signed by CN=Corp Root: the intermediate does not chain to the "
                                           "root"):
        check(given, root=pem(stranger.root))


def test_an_intermediate_of_path_length_0_leaves_no_room_for_the_controllers_intermediate() -> None:
    with pytest.raises(GivenCAError, match="the intermediate has path length 0: mesh signs the controllers' own "
                                           "intermediate under the intermediate") as refused:
        check(owner(path_length=0))
    assert "pathlen >= 1" in str(refused.value)


def test_name_constraints_must_allow_the_trust_domain() -> None:
    elsewhere = x509.NameConstraints([x509.UniformResourceIdentifier("other.mesh")], None)
    with pytest.raises(GivenCAError, match="permits URI names only under other.mesh"):
        check(owner(constraints=elsewhere))
    excluded = x509.NameConstraints(None, [x509.UniformResourceIdentifier(".mesh")])
    with pytest.raises(GivenCAError, match="excludes URI names under .mesh"):
        check(owner(constraints=excluded))
    check(owner(constraints=x509.NameConstraints([x509.UniformResourceIdentifier(TD)], None)))
    assert uri_host_matches(".mesh", TD) and not uri_host_matches(".mesh", "mesh")


def test_a_file_that_is_not_pem_is_refused_without_quoting_it() -> None:
    given = owner()
    with pytest.raises(GivenCAError, match="the intermediate key is not a PEM private key"):
        check(given, key=b"secret-bytes")
    with pytest.raises(GivenCAError, match="the root certificate is not a PEM certificate"):
        check(given, root=b"nope")


# ---- mesh ca init --intermediate ---------------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_with_an_intermediate_holds_no_root_key_and_chains_leaves_through_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    given = owner()
    cert_path, key_path, root_path = given.files(tmp_path / "owner")
    state = tmp_path / "state"
    assert run(["ca", "init", "--state-dir", str(state), "--trust-domain", TD, "--intermediate", cert_path,
                key_path, "--root", root_path]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "mesh holds no root key" in printed and "BEGIN" not in printed
    ca_dir = state / "ca"
    assert not (ca_dir / "root.key").exists() and mode(ca_dir) == 0o700
    assert mode(ca_dir / "intermediate.key") == 0o600 and mode(ca_dir / "controller-intermediate.key") == 0o600
    ca = CertificateAuthority.load(str(state))
    assert ca.brought and ca.root == given.root and ca.bundle_pem == pem(given.root)
    issuer = ca.controller_issuer(create=False)
    assert issuer is not None
    controllers = x509.load_pem_x509_certificates(issuer.cert_pem)
    assert controllers[1] == given.intermediate, "the controllers' chain carries the owner's intermediate"
    controllers[0].verify_directly_issued_by(given.intermediate)
    csr_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                              "x")]))
           .sign(csr_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    issued = ca.sign(csr, f"spiffe://{TD}/svc/web", timedelta(hours=1), "vm1", "web")
    assert chains_to(issued.chain_pem, pem(given.root)) and not ca.needs_renewal(issued.chain_pem)


def test_init_refuses_a_bad_intermediate_with_exit_1_and_makes_nothing(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    given = owner(path_length=0)
    cert_path, key_path, root_path = given.files(tmp_path / "owner")
    state = tmp_path / "state"
    assert run(["ca", "init", "--state-dir", str(state), "--intermediate", cert_path, key_path, "--root",
                root_path]) == EXIT_ERROR
    assert "path length 0" in capsys.readouterr().err and not state.exists()
    assert run(["ca", "init", "--state-dir", str(state), "--intermediate", cert_path, key_path]) == EXIT_USAGE
    assert run(["ca", "init", "--state-dir", str(state), "--root", root_path]) == EXIT_USAGE


def test_init_with_an_intermediate_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    CertificateAuthority.ensure(str(tmp_path / "state"), TD)
    given = owner()
    with pytest.raises(Exception, match="already holds a mesh CA: refusing to replace it"):
        from mesh.pki.byo import check_given_ca as checked

        CertificateAuthority.bring(str(tmp_path / "state"), TD,
                                   checked(pem(given.intermediate), key_pem(given.key), pem(given.root), TD, NOW))


# ---- rotating a brought CA ---------------------------------------------------------------------------------

def test_a_brought_ca_rotates_to_a_new_intermediate_under_the_same_root(tmp_path: Path) -> None:
    given = owner()
    state = str(tmp_path / "state")
    ca = CertificateAuthority.bring(state, TD, check_given_ca(pem(given.intermediate), key_pem(given.key),
                                                              pem(given.root), TD, NOW))
    old_issuer = ca.controller_issuer(create=False)
    new_key = ec.generate_private_key(ec.SECP256R1())
    renewed = cert("Corp Mesh Intermediate 2", new_key, (given.root, given.root_key), path_length=1)
    begin(ca.ca_dir, TD, check_given_ca(pem(renewed), key_pem(new_key), pem(given.root), TD, NOW))
    started = CertificateAuthority.load(state)
    assert started.bundle_pem == pem(given.root), "the same root: one root in the bundle"
    switch(ca.ca_dir)
    switched = CertificateAuthority.load(state)
    assert switched.intermediate == renewed and switched.controller_issuer(create=False) != old_issuer
    csr_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                              "x")]))
           .sign(csr_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    old_leaf = ca.sign(csr, f"spiffe://{TD}/svc/web", timedelta(hours=1), "vm1", "web").chain_pem
    assert switched.needs_renewal(old_leaf), "a leaf of the old intermediate is re-issued though the root is the same"
    finish(ca.ca_dir)
    assert not (Path(state) / "ca" / "root.key").exists()
    assert CertificateAuthority.load(state).intermediate == renewed


def test_rotate_start_on_a_brought_ca_needs_the_owners_next_intermediate(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from fleet_samples import FLEET_INVENTORY

    given = owner()
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(FLEET_INVENTORY)
    CertificateAuthority.bring(str(tmp_path / "state"), TD, check_given_ca(
        pem(given.intermediate), key_pem(given.key), pem(given.root), TD, NOW))
    assert run(["ca", "rotate", "start", "-i", str(inventory)]) == EXIT_USAGE
    assert "needs the new intermediate, --intermediate CERT KEY" in capsys.readouterr().err


def test_a_mesh_ca_rotates_onto_an_owners_intermediate_and_archives_its_root_key(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    own, _ = CertificateAuthority.ensure(state, TD)
    given = owner()
    begin(own.ca_dir, TD, check_given_ca(pem(given.intermediate), key_pem(given.key), pem(given.root), TD, NOW))
    assert CertificateAuthority.load(state).bundle_pem == own.root_pem + pem(given.root)
    switch(own.ca_dir)
    archive = Path(finish(own.ca_dir))
    done = CertificateAuthority.load(state)
    assert done.brought and done.bundle_pem == pem(given.root) and done.intermediate == given.intermediate
    assert not (Path(own.ca_dir) / "root.key").exists() and (archive / "root.key").exists()
    assert mode(archive / "root.key") == 0o600


def test_leaves_under_a_brought_ca_verify_against_its_root_alone(tmp_path: Path) -> None:
    """As mesh-ctl checks a leaf the controllers send (openssl verify against the host's bundle, the chain as
    untrusted): a deploy's leaf and a controller's leaf, under an intermediate two below the root, verify against
    the root alone (each carries its whole chain)."""
    import subprocess

    from mesh.controller.rotation import load_signer

    given = owner(path_length=1)
    # a corporate root -> a corporate intermediate -> the intermediate mesh gets: its file carries the middle one
    middle_key = ec.generate_private_key(ec.SECP256R1())
    middle = cert("Corp Issuing CA", middle_key, (given.root, given.root_key), path_length=2)
    mesh_key = ec.generate_private_key(ec.SECP256R1())
    mesh_int = cert("Corp Mesh Intermediate", mesh_key, (middle, middle_key), path_length=1)
    state = str(tmp_path / "state")
    ca = CertificateAuthority.bring(state, TD, check_given_ca(pem(mesh_int) + pem(middle), key_pem(mesh_key),
                                                              pem(given.root), TD, NOW))
    issuer = ca.controller_issuer(create=False)
    assert issuer is not None
    (tmp_path / "ctl.pem").write_bytes(issuer.cert_pem)
    (tmp_path / "ctl.key").write_bytes(issuer.key_pem)
    signer = load_signer(TD, str(tmp_path / "ctl.pem"), str(tmp_path / "ctl.key"))
    (tmp_path / "root.pem").write_bytes(pem(given.root))

    csr_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                              "x")]))
           .sign(csr_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    chains = {"deploy": ca.sign(csr, f"spiffe://{TD}/svc/web", timedelta(hours=1), "vm1", "web").chain_pem,
              "controller": signer.sign(csr, f"spiffe://{TD}/svc/web", timedelta(hours=1), datetime.now(UTC)).chain_pem}
    for who, chain in chains.items():
        certs = x509.load_pem_x509_certificates(chain)
        (tmp_path / "leaf.pem").write_bytes(pem(certs[0]))
        (tmp_path / "chain.pem").write_bytes(b"".join(pem(c) for c in certs[1:]))
        done = subprocess.run(["openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile", str(tmp_path / "root.pem"),
                               "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{who}: {done.stdout}{done.stderr}"
        assert not ca.needs_renewal(chain), who
