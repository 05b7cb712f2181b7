"""An xds proxy started as its unit starts it, on loopback with the real Envoy and the real ADS server (no lab):
the start step (templates/host/envoy-start) with the envoy-ads.yaml mesh renders. With a controller answering,
Envoy runs over ADS (mTLS with the proxy's certificate from its file, the controller checked by SNI and SPIFFE ID)
and the server shows every type synced; with none, Envoy runs from its files. Either way /server_info shows the
one bootstrap digest both files carry, and admin/delivery says which."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from mesh.config import compute_proxy_config
from mesh.config.validate import envoy_binary
from mesh.config.xds import XdsBootstrap
from mesh.controller.snapshot import ProxySnapshot
from mesh.inventory.model import controller_spiffe_id
from mesh.render import TEMPLATES_DIR, ProxyFiles, render_proxy_files
from mesh.testing.loopback import (
    Identity,
    RunningEnvoy,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    proxy_config_in,
    stop_envoys,
    two_service_mesh,
)
from mesh.xds.resources import ads_resources
from mesh.xds.server import XdsServer
from tests.xds_samples import FixedCert, LeafSigner

TRUST_DOMAIN = "loop.mesh"
START = TEMPLATES_DIR / "host" / "envoy-start"
WAIT_S = 15.0


@dataclass
class XdsProxy:
    """web on loopback, its leaf (naming its node id) from mesh's CA, its files rendered for one controller."""

    files: ProxyFiles
    node_id: str
    root_pem: bytes
    signer: LeafSigner


def _xds_proxy(tmp_path: Path, controller_port: int) -> XdsProxy:
    loop = two_service_mesh(free_port(), TRUST_DOMAIN)
    issue_identities(tmp_path / "state", TRUST_DOMAIN, (loop.web,))  # makes the CA the signer uses
    signer = LeafSigner.of_mesh(tmp_path / "state")
    cfg = proxy_config_in(compute_proxy_config(loop.mesh, loop.web), tmp_path / "web", loop.address(loop.web))
    cfg = replace(cfg, xds=XdsBootstrap(("127.0.0.1",), controller_port, f"controller.{TRUST_DOMAIN}",
                                        controller_spiffe_id(TRUST_DOMAIN)))
    files = render_proxy_files(cfg)
    leaf = signer.issue(loop.web.spiffe_id, (cfg.node_id,))
    lay_out_proxy(files, Identity(leaf.chain_pem, leaf.key_pem, signer.root_pem))
    return XdsProxy(files, cfg.node_id, signer.root_pem, signer)


@contextlib.contextmanager
def started(files: ProxyFiles) -> Iterator[RunningEnvoy]:
    """Envoy through the start step, with the unit's Envoy options, until its admin says LIVE."""
    log = Path(files.proxy_dir, "envoy.log")
    base_id = free_base_ids(1)[0]
    with log.open("wb") as sink:
        process = subprocess.Popen(["sh", str(START), files.proxy_dir, envoy_binary(), "--base-id", str(base_id),
                                    "--disable-hot-restart", "--reject-unknown-dynamic-fields", "--log-level", "warn"],
                                   stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    envoy = RunningEnvoy("web", process, Path(files.proxy_dir, "admin", "admin.sock"), base_id, log)

    def live() -> bool | None:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        with contextlib.suppress(OSError, http.client.HTTPException):
            return envoy.admin("/ready").strip() == "LIVE" or None
        return None

    try:
        eventually(live, WAIT_S, "Envoy LIVE", log)
        yield envoy
    finally:
        stop_envoys([envoy])


def _metadata(envoy: RunningEnvoy) -> dict[str, str]:
    return dict(json.loads(envoy.admin("/server_info"))["node"]["metadata"])


def test_a_controller_answering_starts_envoy_over_ads_and_every_type_syncs(tmp_path: Path) -> None:
    port = free_port()
    proxy = _xds_proxy(tmp_path, port)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(proxy.root_pem)
    server = XdsServer(port, FixedCert(proxy.signer.serving_cert(TRUST_DOMAIN)), str(bundle), TRUST_DOMAIN,
                       host="127.0.0.1")
    server.update({proxy.node_id: ads_resources(ProxySnapshot("h-web", proxy.files, "test"), proxy.node_id,
                                                proxy.root_pem.decode())})
    server.start()
    files = proxy.files
    try:
        with started(files) as envoy:
            assert Path(files.proxy_dir, "admin", "delivery").read_text() == "xds\n"
            assert _metadata(envoy) == {"mesh_bootstrap_sha256": files.bootstrap_sha256, "mesh_delivery": "xds"}

            def synced() -> bool | None:
                stream = server.status().get(proxy.node_id)
                states = {item.type: item.state for item in stream.types} if stream is not None else {}
                return (set(states) >= {"CDS", "EDS", "LDS", "RDS", "SDS"} and set(states.values()) == {"synced"}) \
                    or None

            eventually(synced, WAIT_S, "every type synced over ADS", Path(files.proxy_dir, "envoy.log"))
            assert "inbound" in envoy.admin("/listeners")  # what the stream brought
    finally:
        server.stop()
    assert f"(xds): controller 127.0.0.1:{port} answered" in Path(files.proxy_dir, "envoy.log").read_text()


def test_no_controller_answering_starts_envoy_from_its_files(tmp_path: Path) -> None:
    files = _xds_proxy(tmp_path, free_port()).files  # nothing listens there
    with started(files) as envoy:
        assert Path(files.proxy_dir, "admin", "delivery").read_text() == "files\n"
        assert _metadata(envoy) == {"mesh_bootstrap_sha256": files.bootstrap_sha256}
        assert "inbound" in envoy.admin("/listeners")
    assert "(files): no controller answered" in Path(files.proxy_dir, "envoy.log").read_text()
