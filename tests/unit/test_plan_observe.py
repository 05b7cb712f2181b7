"""mesh.hosts.observe: the observation script run by a real `sh` against a temp folder standing in for /etc/mesh
(with stand-ins for the host's tools that must not depend on this machine: systemctl, curl, docker, nft, getent),
and parse_facts on what such a script prints."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.hosts.errors import FactError
from mesh.hosts.observe import ENVOY_SHA_CACHE_SUFFIX, ObserveRequest, observe_script, parse_facts

BOOT = "b" * 64
TOOLS = {
    # `systemctl show`: web's unit enabled and running, any other unknown to systemd (no unit file state)
    "systemctl": """[ "$1" = show ] || exit 1
shift; while [ "$1" != -- ]; do shift; done; shift
for u in "$@"; do
  if [ "$u" = mesh-envoy-web-8080.service ]; then s=enabled; a=active; else s=; a=inactive; fi
  printf 'Id=%s\\nUnitFileState=%s\\nActiveState=%s\\n\\n' "$u" "$s" "$a"
done""",
    # Envoy's admin API, as pretty-printed as Envoy's, on web's socket only
    "curl": f"""for a in "$@"; do case "$a" in */web-8080/admin/admin.sock) printf '{{\\n "node": {{\\n  "metadata": {{\\n   \
"mesh_bootstrap_sha256": "{BOOT}"\\n  }}\\n }}\\n}}\\n'; exit 0 ;; esac; done; exit 7""",
    "getent": """printf 'root:x:0:0:root:/root:/bin/bash\\nmesh-web-8080:x:998:998:mesh proxy:/:/usr/sbin/nologin\\n'""",
    "docker": """case "$1 $2" in
  "ps --all") printf 'S\\tmesh-envoy-api-api-v2-1\\t0123456789abcdef\\trunning\\n' ;;
  "image inspect") [ "$5" = mesh-envoy:present ] ;;
esac""",
    "nft": "exit 1",  # no table loaded
}


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A temp folder holding what a VM's /etc/mesh and /etc/systemd/system would, and the stand-in tools."""
    proxy = tmp_path / "etc/mesh/proxies/web-8080"
    (proxy / "xds").mkdir(parents=True)
    (proxy / "tls.1").mkdir()
    (proxy / "tls").symlink_to("tls.1")
    (proxy / "envoy.yaml").write_text("node: {}\n")
    (proxy / "envoy.yaml").chmod(0o640)
    (proxy / "xds" / "cds.yaml").write_text("resources: []\n")
    (proxy / "xds" / "lds.yaml").write_text("")
    (tmp_path / "etc/mesh/proxies/old-3").mkdir()
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("mesh-envoy-web-8080.service", "mesh-envoy-old-3.service", "mesh-firewall.service"):
        (units / name).write_text("[Unit]\n")
    tools = tmp_path / "bin"
    tools.mkdir()
    for name, body in TOOLS.items():
        (tools / name).write_text(f"#!/bin/sh\n{body}\n")
        (tools / name).chmod(0o755)
    return tmp_path


def observe_here(root: Path, request: ObserveRequest) -> str:
    script = observe_script(request, proxies_root=f"{root}/etc/mesh/proxies", units_dir=f"{root}/etc/systemd/system")
    ran = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "PATH": f"{root}/bin:{os.environ['PATH']}"})
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def key_and_certificate(folder: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key_path, cert_path, public


def test_the_script_reads_files_folders_links_proxies_units_and_users(host: Path) -> None:
    proxy = host / "etc/mesh/proxies/web-8080"
    request = ObserveRequest(
        paths=(str(proxy / "envoy.yaml"), str(proxy), str(proxy / "tls") + "/", str(proxy / "missing.yaml")),
        listed=(str(proxy / "xds"), str(host / "etc/mesh/proxies/old-3/xds")),
        units=("mesh-envoy-web-8080.service", "mesh-envoy-db-5432.service"),
        users=("root", "mesh-nobody-has-this-name"))
    facts = parse_facts("vm1", observe_here(host, request), request.users)
    config = facts.path(str(proxy / "envoy.yaml"))
    assert (config.kind, config.mode, config.owner, config.uid) == ("file", 0o640, "root", "0")
    assert config.sha256 == hashlib.sha256(b"node: {}\n").hexdigest()
    assert facts.path(str(proxy)).kind == "directory" and facts.path(str(proxy)).sha256 is None
    assert facts.path(str(proxy / "tls") + "/").kind == "directory"  # the link followed to its folder
    assert not facts.path(str(proxy / "missing.yaml")).exists and not facts.path("/never/asked").exists
    # every file of a listed folder, empty ones too; a missing folder lists nothing
    assert facts.path(str(proxy / "xds" / "lds.yaml")).sha256 == hashlib.sha256(b"").hexdigest()
    assert sorted(p for p in facts.paths if "/xds/" in p) == [str(proxy / "xds/cds.yaml"), str(proxy / "xds/lds.yaml")]
    assert facts.proxies == ("old-3", "web-8080")
    assert facts.unit_files == ("mesh-envoy-old-3.service", "mesh-envoy-web-8080.service")  # proxies' units only
    web, db = facts.units["mesh-envoy-web-8080.service"], facts.units["mesh-envoy-db-5432.service"]
    assert (web.enabled, web.active) == ("enabled", "active") and (db.enabled, db.active) == ("not-found", "inactive")
    assert facts.users == ("root",) and facts.mesh_users == ("mesh-web-8080",)  # mesh's by their comment
    assert facts.firewall_loaded is None and facts.sidecars == {} and facts.envoy_sha256 is None  # not asked


def test_the_script_reads_what_envoy_runs_and_the_public_parts_of_certificates(host: Path) -> None:
    proxy = host / "etc/mesh/proxies/web-8080"
    key, cert, public = key_and_certificate(proxy / "tls.1")
    request = ObserveRequest(
        admin_sockets=(("web-8080", str(proxy / "admin/admin.sock")), ("db-5432", "/nowhere/admin.sock")),
        certificates=(("web-8080", str(proxy / "tls/cert.pem"), str(proxy / "tls/key.pem")),
                      ("checker", str(host / "none.pem"), str(host / "none.key"))))
    facts = parse_facts("vm1", observe_here(host, request))
    assert facts.running == {"web-8080": BOOT, "db-5432": ""}
    assert facts.certificates["web-8080"].cert_pem == cert.read_bytes()
    assert facts.certificates["web-8080"].public_key_pem == public
    assert facts.certificates["checker"].cert_pem is None and facts.certificates["checker"].public_key_pem is None
    assert key.read_bytes() not in observe_here(host, request).encode()  # never a private key


def test_the_script_reads_envoys_binary_by_its_record_while_size_and_mtime_match(host: Path) -> None:
    binary = host / "envoy"
    binary.write_bytes(b"an envoy")
    request = ObserveRequest(envoy_binary=str(binary))
    assert parse_facts("vm1", observe_here(host, request)).envoy_sha256 == hashlib.sha256(b"an envoy").hexdigest()
    stat = binary.stat()
    Path(str(binary) + ENVOY_SHA_CACHE_SUFFIX).write_text(f"{'c' * 64} {stat.st_size} {int(stat.st_mtime)}\n")
    assert parse_facts("vm1", observe_here(host, request)).envoy_sha256 == "c" * 64  # not hashed again
    os.utime(binary, (stat.st_atime, stat.st_mtime + 10))  # replaced since: hashed
    assert parse_facts("vm1", observe_here(host, request)).envoy_sha256 == hashlib.sha256(b"an envoy").hexdigest()
    binary.unlink()
    assert parse_facts("vm1", observe_here(host, request)).envoy_sha256 is None


def test_the_script_reads_sidecars_image_rules_firewall_and_the_checker_marker(host: Path) -> None:
    rules = host / "rules.sh"
    rules.write_text("#!/bin/sh\n[ \"$1\" = check ]\n")
    rules.chmod(0o755)
    marker = host / "marker"
    marker.write_text("wheels-abc\n")
    request = ObserveRequest(firewall=True, container_host=True, sidecar_image="mesh-envoy:present",
                             rules_check=f"{rules} check", checker_marker=str(marker))
    facts = parse_facts("dock1", observe_here(host, request))
    assert facts.sidecars["mesh-envoy-api-api-v2-1"].revision == "0123456789abcdef"
    assert facts.sidecars["mesh-envoy-api-api-v2-1"].state == "running"
    assert facts.image_present is True and facts.rules_in_place is True and facts.checker_marker == "wheels-abc"
    assert facts.firewall_loaded is False  # no table: drift
    other = ObserveRequest(sidecar_image="mesh-envoy:missing", rules_check=f"{rules} apply")
    facts = parse_facts("dock1", observe_here(host, other))
    assert facts.image_present is False and facts.rules_in_place is False


def test_paths_with_spaces_and_quotes_come_back_whole(host: Path) -> None:
    odd = host / "it's a file"
    odd.write_text("x")
    facts = parse_facts("vm1", observe_here(host, ObserveRequest(paths=(str(odd),))))
    assert facts.path(str(odd)).sha256 == hashlib.sha256(b"x").hexdigest()


# ---- parse_facts ---------------------------------------------------------------------------------------------

def test_parse_facts_reads_every_line_kind() -> None:
    cert = base64.b64encode(b"CERT").decode()
    text = "\n".join([
        "F\t/etc/mesh/ca.pem\tregular file|644|root|root|0|0", f"H\t{'a' * 64}  /etc/mesh/ca.pem",
        "F\t/etc/mesh/proxies/x/tls/\tdirectory|750|root|64101|0|64101", "P\tx", "UF\tmesh-envoy-x.service",
        "U\tId=mesh-envoy-x.service", "U\tUnitFileState=", "U\tActiveState=inactive", "U\t",
        "U\tActiveState=active", "U\tId=mesh-firewall.service", "U\tUnitFileState=enabled", "U\t",
        "W\troot:root", "W\tmesh-x:mesh proxy", "W\tmesh-y:mesh proxy", "W\tmesh-z:someone else's",
        f"R\tx\t{'b' * 64}", "R\ty\tnot a hash", f"C\tx\t{cert}\t!!not base64",
        "S\tmesh-envoy-x\t0123\texited", f"B\t{'c' * 64}", "N\tloaded", "I\tmissing", "K\tdrift", "M\t", ""])
    facts = parse_facts("h", text, users=("mesh-x", "mesh-z", "mesh-w"))
    assert facts.path("/etc/mesh/ca.pem").sha256 == "a" * 64 and facts.path("/etc/mesh/ca.pem").mode == 0o644
    tls = facts.path("/etc/mesh/proxies/x/tls/")
    assert tls.kind == "directory" and tls.owned_by("0", "64101") and tls.owned_by("root", "64101")
    assert tls.sha256 is None and not facts.path("/gone").exists  # no stat line: absent
    x, firewall = facts.units["mesh-envoy-x.service"], facts.units["mesh-firewall.service"]
    assert (x.enabled, x.active) == ("not-found", "inactive")  # systemd knows no unit file
    assert (firewall.enabled, firewall.active) == ("enabled", "active")  # the block's lines in any order
    assert (facts.proxies, facts.unit_files, facts.users, facts.mesh_users) == (
        ("x",), ("mesh-envoy-x.service",), ("mesh-x", "mesh-z"), ("mesh-x", "mesh-y"))
    assert facts.running == {"x": "b" * 64, "y": ""}
    assert facts.certificates["x"].cert_pem == b"CERT" and facts.certificates["x"].public_key_pem is None
    assert facts.sidecars["mesh-envoy-x"].state == "exited" and facts.envoy_sha256 == "c" * 64
    assert (facts.firewall_loaded, facts.image_present, facts.rules_in_place, facts.checker_marker) == (
        True, False, False, "")


@pytest.mark.parametrize("line", ["X\twhat", "F\t/etc/mesh/ca.pem", "F\t/p\tregular file|644",
                                  "F\t/p\tregular file|6x4|root|root|0|0", "R\tx"])
def test_parse_facts_refuses_a_line_it_cannot_read(line: str) -> None:
    with pytest.raises(FactError, match="vm1: un(expected|readable) fact line"):
        parse_facts("vm1", line + "\n")
