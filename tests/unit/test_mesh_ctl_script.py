"""mesh-ctl, the forced command a controller runs on managed hosts: the real script run by `sh` under a temp root
(MESH_CTL_ROOT), with mesh's real Envoy, proxy files rendered by mesh and certificates from mesh's CA.

What a controller (or an attacker holding its key) sees: files moved into place with their modes, a config Envoy
refuses leaves every file as it was, a new key and certificate swapped in by one rename (and served by a running
Envoy), and every malformed request refused with nothing written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mesh.config import compute_proxy_config
from mesh.config.model import Endpoint, OutboundRoute
from mesh.config.validate import envoy_binary
from mesh.controller import protocol
from mesh.pki import CertificateAuthority
from mesh.render import ProxyFiles, render_proxy_files
from mesh.testing.loopback import (
    Identity,
    TwoServiceMesh,
    eventually,
    free_base_ids,
    free_port,
    lay_out_proxy,
    proxy_config_in,
    start_proxy,
    stop_envoys,
    two_service_mesh,
)

pytestmark = pytest.mark.needs_root(reason="mesh-ctl runs as root (runuser, chown)")

TRUST_DOMAIN = "loop.mesh"
TTL = timedelta(hours=1)


@dataclass
class Host:
    """A managed host under a temp root: mesh's Envoy, the identities file, one proxy laid out as a deploy does."""

    root: Path
    loop: TwoServiceMesh
    ca: CertificateAuthority
    files: ProxyFiles

    @property
    def name(self) -> str:
        return self.files.proxy

    @property
    def home(self) -> Path:
        return Path(self.files.proxy_dir)

    def run(self, request: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["sh", str(protocol.script_path()), request], input=stdin, capture_output=True,
                              env={"MESH_CTL_ROOT": str(self.root), "PATH": "/usr/bin:/bin"}, timeout=60,
                              check=False)
        run_dir = self.root / "run" / "mesh-ctl"  # its temp files gone, whatever the answer
        assert not run_dir.exists() or {path.name for path in run_dir.iterdir()} <= {"lock"}
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())

    def state(self) -> protocol.HostState:
        done = self.run("state")
        assert done.returncode == 0, done.stderr
        return protocol.parse_state(done.stdout)

    def rendered(self, endpoints: tuple[Endpoint, ...] | None = None, rename: str | None = None) -> ProxyFiles:
        """web's files, with other endpoints for its api cluster, or that cluster renamed."""
        cfg = proxy_config_in(compute_proxy_config(self.loop.mesh, self.loop.web), self.home,
                              self.loop.address(self.loop.web))
        cluster = cfg.cluster("upstream-api")
        changed = replace(cluster, endpoints=endpoints or cluster.endpoints, name=rename or cluster.name)
        outbound = tuple(replace(item, cluster=changed.name, route=_renamed(item.route, cluster.name, changed.name))
                         if item.cluster == cluster.name else item for item in cfg.outbound)
        clusters = tuple(changed if item.name == cluster.name else item for item in cfg.clusters)
        return render_proxy_files(replace(cfg, clusters=clusters, outbound=outbound))


def _renamed(route: OutboundRoute | None, old: str, new: str) -> OutboundRoute | None:
    """`route` sending to cluster `new` where it sent to `old`."""
    if route is None:
        return None
    return replace(route, routes=tuple(replace(entry, clusters=tuple(
        replace(item, name=new) if item.name == old else item for item in entry.clusters)) for entry in route.routes))


def _make_host(root: Path) -> Host:
    loop = two_service_mesh(free_port())
    ca, _created = CertificateAuthority.ensure(str(root / "state"), TRUST_DOMAIN)
    home = root / "etc" / "mesh" / "proxies" / "web"
    files = render_proxy_files(proxy_config_in(compute_proxy_config(loop.mesh, loop.web), home,
                                               loop.address(loop.web)))
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign(_csr(key, "web"), loop.web.spiffe_id, TTL, loop.web.host, files.proxy)
    lay_out_proxy(files, Identity(issued.chain_pem, _key_pem(key), ca.root_pem))
    (root / "usr/local/lib/mesh").mkdir(parents=True)
    (root / "usr/local/lib/mesh/envoy").symlink_to(envoy_binary())
    (root / "etc/mesh/ctl").mkdir(parents=True)
    checker = root / "etc" / "mesh" / "checker"
    checker.mkdir(parents=True)
    (checker / "ca.pem").write_bytes(ca.root_pem)
    (root / "etc/mesh/ctl/identities").write_text(
        f"{files.proxy} vm {home} root web {home}/ca.pem -\n"
        f"checker checker {checker} root health {checker}/ca.pem -\n")
    return Host(root, loop, ca, files)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return _make_host(tmp_path / "host")


@pytest.fixture(scope="module")
def untouched_host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    """One host for tests whose every call must be refused with nothing written."""
    return _make_host(tmp_path_factory.mktemp("untouched") / "host")


def _csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .sign(key, hashes.SHA256()))
    return request.public_bytes(Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under root (but the script's run/ folder: its lock) -> (mode, uid, gid, content sha or link)."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if relative == "run" or relative.startswith("run/"):
            continue
        info = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        found[relative] = (info.st_mode, info.st_uid, info.st_gid, what)
    return found


def _changed(old: ProxyFiles, new: ProxyFiles) -> tuple[list[str], list[str]]:
    """(changed paths of new, stale paths of old) between two renders, the bootstrap left out."""
    before = {file.path: file.sha256 for file in old.files}
    changed = [file.path for file in new.files if file.kind != "bootstrap" and before.get(file.path) != file.sha256]
    stale = sorted(set(before) - {file.path for file in new.files})
    return changed, stale


def _on_disk(files: ProxyFiles) -> dict[str, str]:
    return {file.path: Path(file.path).read_text() for file in files.files if file.kind != "bootstrap"}


# --- state ---

def test_state_lists_each_identity_its_files_and_its_certificate(host: Host) -> None:
    state = host.state()
    assert state.identities == {host.name: "vm", "checker": "checker"}
    rendered = {protocol.relpath_in(host.files.proxy_dir, file.path): file.sha256 for file in host.files.files}
    assert state.files[host.name] == rendered
    assert state.files["checker"] == {}
    leaf = x509.load_pem_x509_certificate((host.home / "tls" / "cert.pem").read_bytes())
    cert = state.certs[host.name]
    assert cert is not None
    assert cert.serial == protocol.serial_hex(leaf.serial_number) == f"{leaf.serial_number:x}"
    assert (cert.not_before, cert.not_after) == (leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    assert state.certs["checker"] is None
    contents = {relpath: Path(host.files.proxy_dir, relpath).read_text() for relpath in rendered}
    assert state.resource_version(host.name) == protocol.resource_version_of(contents)


# --- apply ---

def test_apply_moves_changed_files_into_place_with_their_modes_and_removes_stale_ones(host: Host) -> None:
    new = host.rendered(endpoints=(Endpoint("127.0.0.9", 4000),), rename="upstream-api-next")
    changed, stale = _changed(host.files, new)
    assert any(path.endswith("/eds.upstream-api.yaml") for path in stale)
    bundle = protocol.apply_bundle([protocol.bundle_for(new, changed, stale)])

    done = host.run("apply", bundle)

    assert (done.returncode, done.stdout, done.stderr) == (0, f"applied {host.name}\n", "")
    assert protocol.parse_applied(done.stdout) == (host.name,)
    for file in new.files:
        path = Path(file.path)
        assert path.read_text() == file.content
        if file.path in changed:
            info = path.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, 0)
    assert not any(Path(path).exists() for path in stale)
    assert not (host.home / protocol.CTL_STAGING_NAME).exists()
    after = host.state()
    assert after.resource_version(host.name) == protocol.resource_version_of(
        {protocol.relpath_in(new.proxy_dir, file.path): file.content for file in new.files})


def test_a_config_envoy_refuses_is_reported_and_nothing_is_moved(host: Host) -> None:
    new = host.rendered(endpoints=(Endpoint("127.0.0.9", 4000),))
    changed, stale = _changed(host.files, new)
    part = protocol.bundle_for(new, changed, stale)
    broken = replace(part, validate_yaml=part.validate_yaml.replace("connect_timeout:", "connect_timeout_typo:", 1))
    before = _tree(host.root)

    done = host.run("apply", protocol.apply_bundle([broken]))

    assert done.returncode == 1
    assert done.stdout == ""
    assert f"mesh-ctl: {host.name}: Envoy refused the files (nothing was moved)" in done.stderr
    assert "[critical]" in done.stderr and "connect_timeout_typo" in done.stderr
    assert _tree(host.root) == before


def test_apply_waits_for_a_running_envoy_to_take_each_file_and_a_new_certificate_reaches_it(host: Host) -> None:
    (base_id,) = free_base_ids(1)
    envoy = start_proxy("web", host.files, base_id)
    try:
        new = host.rendered(endpoints=(Endpoint("127.0.0.9", 4000),), rename="upstream-api-next")
        changed, stale = _changed(host.files, new)
        done = host.run("apply", protocol.apply_bundle([protocol.bundle_for(new, changed, stale)]))
        assert done.returncode == 0, done.stderr
        # when apply answers, Envoy already runs the new clusters and listeners (the script waited for them)
        clusters = envoy.admin("/clusters")
        assert "upstream-api-next::127.0.0.9:4000" in clusters
        assert "upstream-api::" not in clusters

        served = _served_serial(envoy.admin("/certs"))
        version, csr = protocol.parse_pending(host.run(protocol.command("csr", host.name)).stdout)
        issued = host.ca.sign(csr, host.loop.web.spiffe_id, TTL, host.loop.web.host, host.name)
        installed = host.run(protocol.command("install", host.name, version), issued.chain_pem)
        assert installed.returncode == 0, installed.stderr
        assert protocol.parse_installed(installed.stdout, host.name) == issued.serial != served
        eventually(lambda: _served_serial(envoy.admin("/certs")) == issued.serial, 10, "Envoy serves the new leaf")
        assert envoy.process.poll() is None  # the same Envoy: no restart
    finally:
        stop_envoys([envoy])


def test_a_route_file_alone_is_taken_by_the_running_envoy(host: Host) -> None:
    """What a controller pushes for a traffic override: one rds file, no restart."""
    from mesh.inventory.policy import Abort, Fault, TrafficOverride

    (base_id,) = free_base_ids(1)
    envoy = start_proxy("web", host.files, base_id)
    try:
        fault = TrafficOverride(fault=Fault(abort=Abort(503, 100.0)), revision="r-1")
        new = render_proxy_files(proxy_config_in(compute_proxy_config(host.loop.mesh, host.loop.web, {"api": fault}),
                                                 host.home, host.loop.address(host.loop.web)))
        changed, stale = _changed(host.files, new)
        assert [path.rsplit("/", 1)[-1] for path in changed] == ["rds.outbound-api.yaml"] and stale == []
        done = host.run("apply", protocol.apply_bundle([protocol.bundle_for(new, changed, stale)]))
        assert (done.returncode, done.stdout) == (0, f"applied {host.name}\n"), done.stderr
        # when apply answers, Envoy already runs the new route (the script waited for its version)
        routes = json.loads(envoy.admin("/config_dump?resource=dynamic_route_configs"))["configs"]
        [outbound] = [item["route_config"] for item in routes if item["route_config"]["name"] == "outbound-api"]
        entry = outbound["virtual_hosts"][0]["routes"][0]
        assert entry["typed_per_filter_config"]["envoy.filters.http.fault"]["abort"]["http_status"] == 503
        assert envoy.process.poll() is None  # the same Envoy: no restart
    finally:
        stop_envoys([envoy])


def _served_serial(certs: str) -> str:
    chains = [chain for item in json.loads(certs)["certificates"] for chain in item.get("cert_chain", [])]
    leaf = next(chain for chain in chains if any(san.get("uri") for san in chain.get("subject_alt_names", [])))
    return str(leaf["serial_number"]).lstrip("0") or "0"


def test_apply_refuses_the_checker_and_an_identity_not_on_this_host(host: Host) -> None:
    part = protocol.bundle_for(host.files, [host.files.files[0].path])
    for name, reason in (("checker", "checker has no resource files"), ("ghost", "unknown identity ghost")):
        before = _tree(host.root)
        done = host.run("apply", protocol.apply_bundle([part, replace(part, name=name)]))
        assert (done.returncode, done.stdout) == (2, "")
        assert f"mesh-ctl: refused: {reason}" in done.stderr
        assert _tree(host.root) == before


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo,
                                                                                                   bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, len(data) if kind == tarfile.REGTYPE else 0, 0o644
    return info, data


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], form: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=form) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


def _pax_path(name: str, path: str) -> tarfile.TarInfo:
    info, _data = _member(name)
    info.pax_headers = {"path": path}
    return info


BAD_NAME, NOT_REGULAR = "bundle member with a bad name", "bundle members must be regular files"
ATTACKS: dict[str, tuple[Callable[[str, str], list[tuple[tarfile.TarInfo, bytes]]], str]] = {
    "parent folder": (lambda name, outside: [_member("../escaped.yaml")], BAD_NAME),
    "parent inside a name": (lambda name, outside: [_member(f"{name}/xds/../../../escaped.yaml")], BAD_NAME),
    "absolute name": (lambda name, outside: [_member(f"{outside}/escaped.yaml")], BAD_NAME),
    "pax header path": (lambda name, outside: [(_pax_path(f"{name}/xds/lds.yaml", "../../escaped.yaml"), b"x")],
                        BAD_NAME),
    "symlink member": (lambda name, outside: [_member(f"{name}/xds/lds.yaml", kind=tarfile.SYMTYPE,
                                                      link=f"{outside}/escaped.yaml")], NOT_REGULAR),
    "hard link member": (lambda name, outside: [_member(f"{name}/xds/lds.yaml", kind=tarfile.LNKTYPE,
                                                        link="/etc/passwd")], NOT_REGULAR),
    "folder member": (lambda name, outside: [_member(f"{name}/xds/", kind=tarfile.DIRTYPE)], NOT_REGULAR),
    "fifo member": (lambda name, outside: [_member(f"{name}/xds/lds.yaml", kind=tarfile.FIFOTYPE)], NOT_REGULAR),
    "bootstrap": (lambda name, outside: [_member(f"{name}/envoy.yaml")], BAD_NAME),
    "key": (lambda name, outside: [_member(f"{name}/tls/key.pem")], BAD_NAME),
    "file outside xds": (lambda name, outside: [_member(f"{name}/ca.pem")], BAD_NAME),
    "shell in a name": (lambda name, outside: [_member(f"{name}/xds/$(touch {outside}/escaped).yaml")], BAD_NAME),
    "newline in a name": (lambda name, outside: [_member(f"{name}/xds/a\n{name}/xds/b.yaml")], BAD_NAME),
    "member twice": (lambda name, outside: [_member(f"{name}/xds/lds.yaml"), _member(f"{name}/xds/lds.yaml")],
                     "a bundle member twice"),
    "no validate.yaml": (lambda name, outside: [_member(f"{name}/xds/lds.yaml")], "validate.yaml in the bundle"),
    "unknown identity": (lambda name, outside: [_member("ghost/validate.yaml")], "unknown identity ghost"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_malformed_bundle_is_refused_and_nothing_is_written(untouched_host: Host, attack: str) -> None:
    host = untouched_host
    outside = host.root.parent / "outside"
    outside.mkdir(exist_ok=True)
    validate = _member(f"{host.name}/validate.yaml", b"static_resources: {}\n")
    make, reason = ATTACKS[attack]
    members = make(host.name, str(outside))
    bundle = _tar(members if attack == "no validate.yaml" else [validate, *members], tarfile.PAX_FORMAT)
    before = _tree(host.root)

    done = host.run("apply", bundle)

    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.startswith("mesh-ctl: refused: ") and reason in done.stderr, done.stderr
    assert _tree(host.root) == before
    assert list(outside.iterdir()) == []


def test_a_bundle_over_8_mib_or_not_a_tar_is_refused(host: Host) -> None:
    before = _tree(host.root)
    for data, reason in ((b"\0" * (protocol.MAX_BUNDLE_BYTES + 1), "bundle larger than"),
                         (b"not a tar archive" * 100, "is not a tar archive"), (b"", "empty bundle"),
                         (b"\0" * 10240, "empty bundle")):
        done = host.run("apply", data)
        assert done.returncode == 2 and done.stderr.startswith("mesh-ctl: refused: ") and reason in done.stderr
    assert _tree(host.root) == before


# --- csr and install ---

def _csr_for(host: Host, name: str) -> tuple[str, bytes]:
    done = host.run(protocol.command("csr", name))
    assert done.returncode == 0, done.stderr
    return protocol.parse_pending(done.stdout)


def test_csr_makes_a_key_on_the_host_and_install_swaps_the_link_to_it(host: Host) -> None:
    old_target = os.readlink(host.home / "tls")
    version, csr = _csr_for(host, host.name)

    request = x509.load_pem_x509_csr(csr)
    assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    folder = host.home / f"tls.{version}"
    key = (folder / "key.pem").stat()
    assert (stat.S_IMODE(key.st_mode), key.st_uid) == (0o600, 0)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert os.readlink(host.home / "tls") == old_target  # nothing served changes before install

    issued = host.ca.sign(csr, host.loop.web.spiffe_id, TTL, host.loop.web.host, host.name)
    done = host.run(protocol.command("install", host.name, version), issued.chain_pem)

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"installed {host.name} {issued.serial}\n"
    assert os.readlink(host.home / "tls") == f"tls.{version}"
    assert (host.home / "tls" / "cert.pem").read_bytes() == issued.chain_pem
    assert stat.S_IMODE((folder / "cert.pem").stat().st_mode) == 0o644
    assert sorted(path.name for path in host.home.glob("tls*")) == ["tls", f"tls.{version}"]
    cert = host.state().certs[host.name]
    assert cert is not None and cert.serial == issued.serial
    again = host.run(protocol.command("install", host.name, version), issued.chain_pem)
    assert again.returncode == 2 and "installed already" in again.stderr


def test_the_checker_identity_is_renewed_the_same_way(host: Host) -> None:
    version, csr = _csr_for(host, "checker")
    assert x509.load_pem_x509_csr(csr).subject.rfc4514_string() == "CN=health"
    issued = host.ca.sign(csr, f"spiffe://{TRUST_DOMAIN}/mesh/health-checker", TTL, "ctl", "checker")
    done = host.run(protocol.command("install", "checker", version), issued.chain_pem)
    assert done.returncode == 0, done.stderr
    cert = host.state().certs["checker"]
    assert cert is not None and cert.serial == issued.serial


def test_install_refuses_a_certificate_for_another_key_or_from_another_ca(host: Host, tmp_path: Path) -> None:
    version, csr = _csr_for(host, host.name)
    spiffe_id, node = host.loop.web.spiffe_id, host.loop.web.host
    other_key = host.ca.sign(_csr(ec.generate_private_key(ec.SECP256R1()), "web"), spiffe_id, TTL, node, host.name)
    foreign_ca, _created = CertificateAuthority.ensure(str(tmp_path / "foreign"), TRUST_DOMAIN)
    foreign = foreign_ca.sign(csr, spiffe_id, TTL, node, host.name)
    before = _tree(host.root)
    for chain, reason in ((other_key.chain_pem, "is not for the pending key"),
                          (foreign.chain_pem, "is not trusted by"),
                          (foreign.cert_pem + host.ca.root_pem, "is not trusted by"),
                          (b"-----BEGIN CERTIFICATE-----\n$(id)\n-----END CERTIFICATE-----\n", "not a PEM"),
                          (b"", "no certificate")):
        done = host.run(protocol.command("install", host.name, version), chain)
        assert done.returncode in (1, 2) and reason in done.stderr, done.stderr
        assert done.stdout == ""
        assert _tree(host.root) == before


def test_install_refuses_a_version_that_is_not_pending(host: Host) -> None:
    before = _tree(host.root)
    done = host.run(protocol.command("install", host.name, "20260101T000000-abcdef"), b"")
    assert done.returncode == 2 and "no pending key 20260101T000000-abcdef" in done.stderr
    assert _tree(host.root) == before


def test_a_container_identity_keys_belong_to_the_sidecar_uid_and_its_files_are_checked_in_a_container(
        host: Host) -> None:
    """On a container host the key's owner is the sidecar's numeric uid and Envoy runs in a throwaway sidecar
    container (`docker run ... IMAGE --mode validate`): when that cannot run (no Docker daemon here), nothing moves."""
    identities = host.root / "etc/mesh/ctl/identities"
    image = "registry.local:5000/mesh/envoy:1.31@sha256:" + "c" * 64
    identities.write_text(identities.read_text()
                          + f"api-api-v2-1 container {host.home} 1000 api {host.home}/ca.pem {image}\n")
    assert host.state().identities["api-api-v2-1"] == "container"
    version, _csr_pem = _csr_for(host, "api-api-v2-1")
    key = (host.home / f"tls.{version}" / "key.pem").stat()
    assert (stat.S_IMODE(key.st_mode), key.st_uid, key.st_gid) == (0o600, 1000, 1000)
    folder = (host.home / f"tls.{version}").stat()
    assert (stat.S_IMODE(folder.st_mode), folder.st_uid, folder.st_gid) == (0o750, 0, 1000)

    new = host.rendered(endpoints=(Endpoint("127.0.0.9", 4000),))
    changed, stale = _changed(host.files, new)
    part = replace(protocol.bundle_for(new, changed, stale), name="api-api-v2-1")
    before = _tree(host.root)
    done = host.run("apply", protocol.apply_bundle([part]))
    assert (done.returncode, done.stdout) == (1, "")
    assert "mesh-ctl: api-api-v2-1: Envoy refused the files (nothing was moved)" in done.stderr
    assert _tree(host.root) == before


# --- requests ---

@pytest.mark.parametrize("request_text", [
    "", " ", "rm -rf /", "sh -c id", "state; id", "state && id", "state extra", "apply now", "csr", "csr a b",
    "csr ../web", "csr web/../x", "csr $(id)", "csr `id`", "csr web|id", "csr -rf", "csr a\nid",
    "install", "install web", "install web 2026", "install web 20261206T111406-1b4b8", "install web ../tls",
    "install web 20261206T111406-1b4b81 x", "STATE", "state\tid", "x" * 600,
])
def test_anything_but_the_four_verbs_is_refused(untouched_host: Host, request_text: str) -> None:
    before = _tree(untouched_host.root)
    done = untouched_host.run(request_text)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("mesh-ctl: refused: ")
    assert _tree(untouched_host.root) == before


def test_an_unknown_identity_is_refused(untouched_host: Host) -> None:
    for request_text in ("csr ghost", "install ghost 20261206T111406-1b4b81"):
        done = untouched_host.run(request_text)
        assert (done.returncode, done.stderr) == (2, "mesh-ctl: refused: unknown identity ghost\n")


@pytest.mark.parametrize("line", [
    "web vm relative/home root web /ca.pem -",
    "web vm /etc/mesh/../../root root web /ca.pem -",
    "web vm /etc/mesh/proxies/web ro$ot web /ca.pem -",
    "web vm /etc/mesh/proxies/web root we;b /ca.pem -",
    "web vm /etc/mesh/proxies/web root web /ca.pem --privileged",
    "web container /etc/mesh/proxies/web 1000 web /ca.pem -",
    "web container /etc/mesh/proxies/web root web /ca.pem image:1",
    "web vm /etc/mesh/proxies/web root web /ca.pem - extra",
    "web daemon /etc/mesh/proxies/web root web /ca.pem -",
    "web vm /etc/mesh/proxies/web root web /ca.pem image:1",
])
def test_a_malformed_identities_file_refuses_every_call(host: Host, line: str) -> None:
    identities = host.root / "etc/mesh/ctl/identities"
    identities.write_text(identities.read_text() + line + "\n")
    for request_text in ("state", f"csr {host.name}"):
        done = host.run(request_text)
        assert (done.returncode, done.stdout) == (2, "")
        assert "mesh-ctl: refused: " in done.stderr and "identities line 3" in done.stderr


def test_each_call_is_logged_with_its_exit_code_and_a_missing_syslog_changes_nothing(host: Host) -> None:
    assert host.run("state").returncode == 0  # no syslog socket: the answer is the same
    (host.root / "dev").mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(host.root / "dev" / "log"))
        syslog.settimeout(5)
        assert host.run("state").returncode == 0
        assert host.run("csr $(reboot)\n").returncode == 2
        logged = [syslog.recv(4096).decode(errors="replace") for _ in range(2)]
    assert "mesh-ctl" in logged[0] and logged[0].endswith("call: state exit: 0")
    assert logged[1].endswith("call: csr ??reboot?? exit: 2")


def test_concurrent_applies_take_turns(host: Host) -> None:
    new = host.rendered(endpoints=(Endpoint("127.0.0.9", 4000),))
    changed, stale = _changed(host.files, new)
    bundle = protocol.apply_bundle([protocol.bundle_for(new, changed, stale)])
    env = {"MESH_CTL_ROOT": str(host.root), "PATH": "/usr/bin:/bin"}
    runs = [subprocess.Popen(["sh", str(protocol.script_path()), "apply"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(3)]
    results = [run.communicate(bundle, timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], results
    assert _on_disk(new) == {file.path: file.content for file in new.files if file.kind != "bootstrap"}




# --- xds proxies: delivery and restart ---

def test_state_reports_the_bootstrap_each_proxy_started_with_when_its_start_step_said(host: Host) -> None:
    assert host.state().delivery == {}  # a files proxy: no marker
    marker = host.home / "admin" / "delivery"
    marker.write_text("xds\n")
    assert host.state().delivery == {host.name: "xds"}
    marker.write_text("files\n")
    assert f"delivery {host.name} files\n" in host.run("state").stdout
    for garbage in ("ads\n", "xds files\n", "x" * 100):  # anything else Envoy's user could write is left out
        marker.write_text(garbage)
        assert host.state().delivery == {}
    marker.unlink()
    marker.symlink_to(host.home / "ca.pem")
    assert host.state().delivery == {}


class FakeAdmin:
    """Envoy's admin socket as far as a drain goes: records each request line, answers 200 with `body`."""

    def __init__(self, path: Path, body: str = "OK\n") -> None:
        self.body = body.encode()
        self.requests: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(4096).decode(errors="replace")
                self.requests.append(data.split("\r\n", 1)[0])
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(self.body)
                             + self.body)

    def close(self) -> None:
        self.server.close()


def _fake_tool(root: Path, name: str, exit_code: int = 0) -> Path:
    """root/usr/bin/NAME recording its arguments (and when) in root/NAME.calls."""
    tool = root / "usr" / "bin" / name
    tool.parent.mkdir(parents=True, exist_ok=True)
    tool.write_text(f"#!/bin/sh\necho \"$(date +%s.%N) $*\" >> {root}/{name}.calls\nexit {exit_code}\n")
    tool.chmod(0o755)
    return root / f"{name}.calls"


def test_restart_drains_the_proxy_then_restarts_its_unit(host: Host) -> None:
    calls = _fake_tool(host.root, "systemctl")
    admin = FakeAdmin(host.home / "admin" / "admin.sock")
    try:
        started = time.time()
        done = host.run(f"restart {host.name}")
    finally:
        admin.close()
    assert (done.returncode, done.stdout) == (0, f"restarted {host.name}\n"), done.stderr
    assert admin.requests == ["POST /drain_listeners?graceful HTTP/1.1"]
    when, command = calls.read_text().splitlines()[0].split(" ", 1)
    assert command == f"restart mesh-envoy-{host.name}.service"
    assert float(when) - started >= 5  # the drain had its 5 s


def test_restart_of_a_sidecar_restarts_its_container_even_when_envoy_does_not_answer(host: Host) -> None:
    identities = host.root / "etc/mesh/ctl/identities"
    identities.write_text(identities.read_text()
                          + f"api-api-v2-1 container {host.home} 1000 api {host.home}/ca.pem mesh-envoy:abc\n")
    calls = _fake_tool(host.root, "docker")
    done = host.run("restart api-api-v2-1")
    assert (done.returncode, done.stdout) == (0, "restarted api-api-v2-1\n")
    assert "api-api-v2-1: Envoy did not take the drain (restarting it anyway)" in done.stderr
    assert calls.read_text().split(" ", 1)[1] == "restart --time 5 mesh-envoy-api-api-v2-1\n"


def test_a_failed_restart_exits_1_with_the_reason(host: Host) -> None:
    _fake_tool(host.root, "systemctl", exit_code=5)
    done = host.run(f"restart {host.name}")
    assert (done.returncode, done.stdout) == (1, "")
    assert f"mesh-ctl: {host.name}: the restart failed" in done.stderr


@pytest.mark.parametrize(("request_text", "message"), [
    ("restart ghost", "unknown identity ghost"),
    ("restart checker", "checker is not a proxy"),
    ("restart", "usage: restart NAME"),
    ("restart web web", "usage: restart NAME"),
    ("restart ../web", "usage: restart NAME"),
])
def test_restart_refuses_what_is_not_a_proxy_of_this_host(untouched_host: Host, request_text: str,
                                                          message: str) -> None:
    calls = _fake_tool(untouched_host.root, "systemctl")
    before = _tree(untouched_host.root)
    done = untouched_host.run(request_text)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"mesh-ctl: refused: {message}\n")
    assert not calls.exists()
    assert _tree(untouched_host.root) == before


def test_apply_to_an_envoy_on_ads_moves_the_files_without_waiting_for_it(host: Host) -> None:
    """An Envoy started from envoy-ads.yaml (the start step's marker says xds) reads no resource file: apply moves
    the last-known-good files and does not wait for Envoy to take them (it never would)."""
    (host.home / "admin" / "delivery").write_text("xds\n")
    # an Envoy that runs this proxy's bootstrap (its digest in every answer) and takes no file
    digest = host.files.bootstrap_sha256
    admin = FakeAdmin(host.home / "admin" / "admin.sock",
                      f'{{"node": {{"metadata": {{"mesh_bootstrap_sha256": "{digest}", "mesh_delivery": "xds"}}}}}}\n')
    try:
        new = host.rendered(endpoints=(Endpoint("127.0.0.9", 4000),), rename="upstream-api-next")
        changed, stale = _changed(host.files, new)
        started = time.monotonic()
        done = host.run("apply", protocol.apply_bundle([protocol.bundle_for(new, changed, stale)]))
        took_s = time.monotonic() - started
    finally:
        admin.close()
    assert (done.returncode, done.stdout) == (0, f"applied {host.name}\n"), done.stderr
    assert took_s < 10, f"apply waited {took_s:.1f} s for an Envoy that reads no file"
    assert "upstream-api-next" in (host.home / "xds" / "cds.yaml").read_text()
    assert any("server_info" in line for line in admin.requests)
