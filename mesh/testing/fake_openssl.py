"""openssl on a fake host, for the deploy steps' unit tests: keys, CSRs and public keys made with
cryptography, the key files written into the fake host's files. Unit tests only; the lab runs the real one."""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.hosts.connection import CommandResult
from mesh.testing.fake_connector import FakeHost

_OK = CommandResult(0, b"", b"")


def stub_openssl(host: FakeHost) -> None:
    """Answer the steps' `openssl genpkey` (with its chown and mv), `openssl req -new`, `openssl pkey`,
    the copy of a key beside a renewed certificate and the swap of a proxy's `tls` link on host, keeping each
    generated key so CSRs and public keys match it."""
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    def genpkey(cmd: str, stdin: bytes | None) -> CommandResult:
        path = _group(r'mv -f "\$t" (\S+)$', cmd)
        owner = _group(r"chown ([^:\s]+)", cmd)
        keys[path] = ec.generate_private_key(ec.SECP256R1())
        host.write(path, b"PRIVATE KEY (fake)", 0o600, owner, owner)
        return _OK

    def csr(cmd: str, stdin: bytes | None) -> CommandResult:
        key = keys[_group(r"-key (\S+)", cmd)]
        request = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])).sign(key, hashes.SHA256()))
        return CommandResult(0, request.public_bytes(serialization.Encoding.PEM), b"")

    def pubkey(cmd: str, stdin: bytes | None) -> CommandResult:
        key = keys[_group(r"-in (\S+)", cmd)]
        return CommandResult(0, key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), b"")

    def swap_link(cmd: str, stdin: bytes | None) -> CommandResult:
        """`ln -sfn tls.V DIR/.tls.new && mv -fT ... DIR/tls && <remove the other tls.* folders>`: the files
        under DIR/tls/ become those of DIR/tls.V/ (the same FakeFile objects, as through a link)."""
        target, temp = (word.strip("'") for word in cmd.split()[2:4])
        folder = temp.rsplit("/", 1)[0]
        version, link = f"{folder}/{target}/", f"{folder}/tls/"
        for path in [p for p in host.files if p.startswith((link, f"{folder}/tls.")) and
                     not (p + "/").startswith(version)] + [f"{folder}/key.pem", f"{folder}/cert.pem"]:
            host.files.pop(path, None)
            keys.pop(path, None)
        if version.rstrip("/") in host.files:  # the link itself: stat follows it to the version's folder
            host.files[link.rstrip("/")] = host.files[version.rstrip("/")]
        for path in [p for p in host.files if p.startswith(version)]:
            host.files[link + path[len(version):]] = host.files[path]
            if path in keys:
                keys[link + path[len(version):]] = keys[path]
        return _OK

    def copy_key(cmd: str, stdin: bytes | None) -> CommandResult:
        """`cp -p KEY NEW`: a key copied beside a renewed certificate (the same key, its file's attributes)."""
        source, dest = (word.strip("'") for word in cmd.split()[2:4])
        found = host.files.get(source)
        if found is None:
            return CommandResult(1, b"", f"cp: cannot stat '{source}'".encode())
        host.write(dest, found.data or b"", found.mode, found.owner, found.group)
        if source in keys:
            keys[dest] = keys[source]
        return _OK

    host.stub(r"openssl genpkey", genpkey)
    host.stub(r"^cp -p ", copy_key)
    host.stub(r"^openssl req -new", csr)
    host.stub(r"^openssl pkey", pubkey)
    host.stub(r"^ln -sfn ", swap_link)


def _group(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise AssertionError(f"the fake openssl does not know this command: {text}")
    return found.group(1)
