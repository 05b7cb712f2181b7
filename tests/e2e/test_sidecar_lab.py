"""The sidecar of a container workload on the real lab's dock1: the image pushed and imported, the sidecar run
in api-v2-1's namespace, proxy_port reachable on dock1's address only, the watcher after an app restart.

The lab is shared: the module holds /tmp/mesh-lab-dev.lock, brings the lab up at its size (idempotent), removes
what it put on dock1 and vm1 at the end, and leaves the lab up. No deploy runs here: a throwaway CA stands in.
"""

from __future__ import annotations

import fcntl
import io
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lab_helpers import LAB_ARGS, mesh

from mesh.config import compute_proxy_config, paths
from mesh.containers.image import SIDECAR_UID, SidecarImage, build_sidecar_image_tar
from mesh.containers.modules import register_container_modules
from mesh.containers.reachability import (
    APP_STATE_PATH,
    LIST_PATH,
    RULES_PATH,
    WATCHER_PATH,
    WATCHER_UNIT,
    WATCHER_UNIT_PATH,
)
from mesh.deploy.modules import registry
from mesh.deploy.playbook import load_playbook
from mesh.deploy.recap import exit_code
from mesh.deploy.results import PlayResult
from mesh.deploy.runner import run_playbook
from mesh.hosts.connection import Connector, connect
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost, Mesh
from mesh.inventory.validate import build_mesh
from mesh.pki import CertificateAuthority
from mesh.render import render_proxy_files

LOCK = "/tmp/mesh-lab-dev.lock"
SIZE = LAB_ARGS  # the shared lab's size: another would take it down
INVENTORY = Path(__file__).resolve().parents[2] / "inventory" / "lab.yaml"
APP, PROXY, SIDECAR = "api-v2-1", "api-api-v2-1", "mesh-envoy-api-api-v2-1"
CLIENT_DIR = "/tmp/mesh-sidecar-e2e"
RESTART_TIMEOUT_S = 30

PLAYBOOK = """
- hosts: dock1
  gather_facts: false
  tasks:
    - name: sidecar image
      mesh.sidecar_image: {{src: "{src}", tag: "{tag}"}}
      register: image
    - name: sidecar
      mesh.sidecar: {{proxy: {proxy}, image: "{{{{ image.tag }}}}"}}
    - name: sidecar host files, watcher and rules
      mesh.sidecar_host: {{}}
"""


@dataclass(frozen=True)
class Lab:
    mesh: Mesh
    dock1: ManagedHost
    vm1: ManagedHost
    image: SidecarImage
    folder: Path

    @property
    def address(self) -> str:
        return self.dock1.connection.address


def _on(host: ManagedHost, cmd: str, timeout: float = 60) -> tuple[int, str]:
    conn = connect(host)
    try:
        result = conn.run(cmd, timeout=timeout)
        return result.code, (result.stdout + result.stderr).decode(errors="replace").strip()
    finally:
        conn.close()


def _from_vm1(cmd: str) -> tuple[int, str]:
    done = mesh("lab", "exec", "vm1", "--", "sh", "-c", cmd, timeout=60)
    return done.returncode, done.stdout + done.stderr


def _leaf(ca: CertificateAuthority, key_pem: bytes | None, spiffe: str, proxy: str) -> tuple[bytes, bytes]:
    """(key, chain) for spiffe: a CSR from key_pem (or a fresh key) signed by the throwaway CA."""
    key = (serialization.load_pem_private_key(key_pem, None) if key_pem else ec.generate_private_key(ec.SECP256R1()))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, proxy)])).sign(key, hashes.SHA256()))
    issued = ca.sign(csr.public_bytes(serialization.Encoding.PEM), spiffe, timedelta(hours=1), "e2e", proxy)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, issued.chain_pem


def _proxy_files(lab: Lab, ca: CertificateAuthority) -> None:
    """What the deploy's certificate and config steps write: a key made on dock1, its chain, CA, envoy.yaml."""
    workload = next(w for w in lab.dock1.workloads if w.container == APP)
    conn: Connector = connect(lab.dock1)
    try:
        key, version = paths.key_path(PROXY), paths.tls_version_dir(PROXY, "e2e")
        # as the deploy lays them out: key and certificate in a versioned folder behind the `tls` link, and
        # Envoy's admin socket folder owned by the sidecar's uid alone
        made = conn.run(f"set -e; mkdir -p {version} {paths.xds_dir(PROXY)}; ln -sfn {version.rsplit('/', 1)[1]} {paths.tls_link(PROXY)}; "
                        f"install -d -m 0700 -o {SIDECAR_UID} -g {SIDECAR_UID} {paths.admin_dir(PROXY)}; umask 077; "
                        f"openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {key} 2>/dev/null; "
                        f"openssl req -new -sha256 -key {key} -subj /CN={PROXY}")
        assert made.ok, made.error_text()
        issued = ca.sign(made.stdout, workload.spiffe_id, timedelta(hours=1), "dock1", PROXY)
        conn.put(issued.chain_pem, paths.cert_path(PROXY), 0o644, "root", "root")
        conn.put(ca.root_pem, paths.proxy_ca_path(PROXY), 0o644, "root", "root")
        for file in render_proxy_files(compute_proxy_config(lab.mesh, workload)).files:  # bootstrap and xds/
            conn.put(file.content.encode(), file.path, 0o640 if file.kind == "bootstrap" else 0o644, "root", "root")
    finally:
        conn.close()
    client_key, client_chain = _leaf(ca, None, "spiffe://lab.mesh/svc/web", "e2e-client")
    vm1 = connect(lab.vm1)
    try:
        vm1.run(f"mkdir -p {CLIENT_DIR}")
        vm1.put(client_key, f"{CLIENT_DIR}/key.pem", 0o600, "root", "root")
        vm1.put(client_chain, f"{CLIENT_DIR}/cert.pem", 0o644, "root", "root")
    finally:
        vm1.close()


def _clean(lab: Lab) -> None:
    _on(lab.dock1, f"docker rm --force {SIDECAR} >/dev/null 2>&1; "
                   f"systemctl disable --now {WATCHER_UNIT} 2>/dev/null; "
                   f"[ -x {RULES_PATH} ] && {RULES_PATH} remove; "
                   f"rm -rf {paths.proxy_dir(PROXY)} {paths.CA_PATH} {LIST_PATH} {RULES_PATH} {WATCHER_PATH} "
                   f"{WATCHER_UNIT_PATH} /run/mesh/sidecar-rules.applied {APP_STATE_PATH}; systemctl daemon-reload; "
                   f"rmdir {paths.MESH_ROOT}/proxies {paths.MESH_ROOT} /usr/local/lib/mesh 2>/dev/null; "
                   f"docker image rm {lab.image.tag} >/dev/null 2>&1; true")
    _on(lab.vm1, f"rm -rf {CLIENT_DIR}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # These tests drive the sidecar parts by hand on dock1: they start from a lab nobody deployed to (the
        # deploy tests before them leave theirs deployed), which a warm `up` gives in seconds.
        down = mesh("lab", "down", timeout=300)
        if down.returncode != 0:
            pytest.fail(f"`mesh lab down` failed:\n{down.stdout}\n{down.stderr}")
        up = mesh("lab", "up", *SIZE, "--inventory", str(INVENTORY), timeout=900)
        if up.returncode != 0:
            pytest.fail(f"`mesh lab up` failed:\n{up.stdout}\n{up.stderr}")
        built = build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))
        folder = tmp_path_factory.mktemp("sidecar")
        made = Lab(built, built.host("dock1"), built.host("vm1"), build_sidecar_image_tar(folder / "cache"), folder)
        _code, found = _on(made.dock1, f"test -e {paths.proxy_dir(PROXY)} && echo taken; "
                                      f"docker container inspect {SIDECAR} >/dev/null 2>&1 && echo sidecar; true")
        if found:
            pytest.fail(f"dock1 already has mesh's files or sidecar for {PROXY} ({found}): not this test's to touch")
        ca, _ = CertificateAuthority.ensure(str(folder / "state"), "lab.mesh")
        try:
            _proxy_files(made, ca)
            yield made
        finally:
            _clean(made)


def _apply(lab: Lab) -> tuple[PlayResult, str]:
    modules = registry.copy()
    register_container_modules(modules)
    path = lab.folder / "play.yml"
    path.write_text(textwrap.dedent(PLAYBOOK.format(src=lab.image.path, tag=lab.image.tag, proxy=PROXY)))
    out = io.StringIO()
    result = run_playbook(load_playbook(path, modules), [lab.dock1], modules=modules, output=out, color=False)
    print(out.getvalue())
    return result, out.getvalue()


def _mtls_get(lab: Lab, port: int) -> tuple[int, str]:
    return _from_vm1(f"curl -sk --max-time 5 --cert {CLIENT_DIR}/cert.pem --key {CLIENT_DIR}/key.pem "
                     f"https://{lab.address}:{port}/")


def _sidecar_id(lab: Lab) -> str:
    return _on(lab.dock1, f"docker container inspect -f '{{{{.Id}}}}' {SIDECAR}")[1]


def _netns(lab: Lab, name: str) -> str:
    return _on(lab.dock1, f"readlink /proc/$(docker container inspect -f '{{{{.State.Pid}}}}' {name})/ns/net")[1]


def test_sidecar_serves_mtls_on_the_host_address_and_nothing_else(lab: Lab) -> None:
    result, out = _apply(lab)
    assert exit_code(result) == 0, out
    assert _netns(lab, SIDECAR) == _netns(lab, APP)
    code, body = _mtls_get(lab, 21000)
    assert code == 0 and '"service": "api"' in body.replace('":"', '": "'), body
    code, shown = _from_vm1(f"openssl s_client -connect {lab.address}:21000 </dev/null 2>&1")
    assert "Server certificate" in shown or "BEGIN CERTIFICATE" in shown, shown  # Envoy answers TLS
    code, _ = _from_vm1(f"curl -sk --max-time 5 https://{lab.address}:21000/")
    assert code != 0  # no client certificate: refused
    app_ip = _on(lab.dock1, f"docker container inspect -f "
                            f"'{{{{range .NetworkSettings.Networks}}}}{{{{.IPAddress}}}} {{{{end}}}}' {APP}")[1].split()[0]
    code, _ = _from_vm1(f"curl -s --max-time 3 http://{lab.address}:9090/")
    assert code != 0
    route = f"{app_ip}/32 via {lab.address}"
    code, out = _from_vm1(f"ip route replace {route}")  # a way to the container: Docker must still drop it
    assert code == 0, out
    try:
        code, body = _from_vm1(f"curl -s --max-time 3 http://{app_ip}:9090/")
        assert code == 28, body  # dropped on dock1 (a timeout), not refused by a missing route
        code, body = _from_vm1(f"curl -sk --max-time 3 https://{app_ip}:21000/")
        assert code != 0, body  # only DNAT'd connections to proxy_port pass
    finally:
        _from_vm1(f"ip route del {route}")


def test_second_apply_changes_nothing(lab: Lab) -> None:
    before = _sidecar_id(lab)
    result, out = _apply(lab)
    assert exit_code(result) == 0 and result.stats["dock1"].changed == 0, out
    assert _sidecar_id(lab) == before


def test_watcher_rejoins_the_sidecar_after_the_app_restarts(lab: Lab) -> None:
    before = _netns(lab, APP)
    code, out = _on(lab.dock1, f"systemctl is-active {WATCHER_UNIT}; docker restart {APP}")
    assert code == 0, out
    assert _netns(lab, APP) != before
    deadline, answered, body = time.monotonic() + RESTART_TIMEOUT_S, False, ""
    while time.monotonic() < deadline and not answered:
        code, body = _mtls_get(lab, 21000)
        answered = code == 0 and _netns(lab, SIDECAR) == _netns(lab, APP)
        if not answered:
            time.sleep(1)
    logs = _on(lab.dock1, f"journalctl -u {WATCHER_UNIT} --no-pager -n 20")[1]
    assert answered, f"no answer within {RESTART_TIMEOUT_S} s: {body}\n{logs}"
    assert f"restarted {SIDECAR}" in logs, logs
    result, out = _apply(lab)  # the watcher left nothing for a deploy to do
    assert exit_code(result) == 0 and result.stats["dock1"].changed == 0, out


def test_rules_script_is_idempotent_and_touches_only_mesh_chains(lab: Lab) -> None:
    snapshot = "iptables-save | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'"
    _, first = _on(lab.dock1, snapshot)
    code, out = _on(lab.dock1, f"{RULES_PATH} apply & {RULES_PATH} apply & wait; {RULES_PATH} check")
    assert code == 0, out
    assert _on(lab.dock1, snapshot)[1] == first
    code, out = _on(lab.dock1, "iptables -t nat -S PREROUTING | grep -c MESH-SIDECARS; "
                               "iptables -S DOCKER-USER | grep -c MESH-SIDECARS-FWD")
    assert out.split() == ["1", "1"], out
