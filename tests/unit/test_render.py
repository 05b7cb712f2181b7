"""Golden files for what mesh renders: Envoy bootstraps, systemd units, nftables tables (tests/golden/).

The input is tests/golden/envoy/input/inventory.yaml; `pytest --update-goldens` rewrites the outputs.
"""

from __future__ import annotations

import configparser
import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml

from mesh.config import InconsistentConfig, compute_proxy_config
from mesh.config.model import ProxyConfig
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh, Workload
from mesh.inventory.validate import build_mesh
from mesh.render import (
    render_envoy_config,
    render_envoy_unit,
    render_firewall,
    render_firewall_unit,
    template_environment,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
INVENTORY = GOLDEN / "envoy" / "input" / "inventory.yaml"
# node id -> the case it stands for
CASES = {
    "web-vm1-0": "web-vm1-http-upstream",
    "api-vm2-0": "api-vm2-tcp-upstream",
    "db-vm2-1": "db-vm2-tcp-health",
    "api-vm3-0": "api-vm3-two-on-host",
    "pricing-vm3-1": "pricing-vm3-grpc",
    "report-vm4-0": "report-vm4-no-upstreams",
}


def golden_mesh() -> Mesh:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))


def workload(mesh: Mesh, node_id: str) -> Workload:
    return next(w for w in mesh.workloads if w.consul_id == node_id)


def check_golden(path: Path, text: str, update: bool) -> None:
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"


def test_every_workload_is_a_case() -> None:
    assert sorted(w.consul_id for w in golden_mesh().workloads) == sorted(CASES)


@pytest.mark.parametrize("node_id", CASES, ids=CASES.get)
def test_envoy_config_golden(node_id: str, update_goldens: bool) -> None:
    mesh = golden_mesh()
    text = render_envoy_config(compute_proxy_config(mesh, workload(mesh, node_id)))
    check_golden(GOLDEN / "envoy" / f"{CASES[node_id]}.yaml", text, update_goldens)


@pytest.mark.parametrize("node_id", CASES, ids=CASES.get)
def test_envoy_unit_golden(node_id: str, update_goldens: bool) -> None:
    mesh = golden_mesh()
    text = render_envoy_unit(compute_proxy_config(mesh, workload(mesh, node_id)))
    check_golden(GOLDEN / "systemd" / f"{CASES[node_id]}.service", text, update_goldens)


@pytest.mark.parametrize("host", ["ctl1", "vm1", "vm2", "vm3", "vm4"])
def test_firewall_golden(host: str, update_goldens: bool) -> None:
    check_golden(GOLDEN / "nftables" / f"{host}.nft", render_firewall(golden_mesh().host(host)), update_goldens)


def test_firewall_unit_golden(update_goldens: bool) -> None:
    check_golden(GOLDEN / "systemd" / "mesh-firewall.service", render_firewall_unit(), update_goldens)


def test_firewall_drops_only_app_ports_off_loopback() -> None:
    text = render_firewall(golden_mesh().host("vm2"))
    rules = [line.strip() for line in text.splitlines() if line.startswith("\t\t") and not line.strip().startswith("#")]
    assert rules[1:] == ['iif "lo" accept', "tcp dport { 5432, 9090 } drop"]  # nothing else: SSH untouched
    assert text.index("table inet mesh\n") < text.index("delete table inet mesh") < text.index("table inet mesh {")


def test_firewall_of_a_host_without_workloads_is_an_empty_table() -> None:
    text = render_firewall(golden_mesh().host("ctl1"))
    assert "chain" not in text and "table inet mesh {\n}" in text


@pytest.mark.parametrize("host", ["ctl1", "vm2"])
def test_firewall_parses_with_nft_check_mode(host: str, tmp_path: Path) -> None:
    script = tmp_path / "firewall.nft"
    script.write_text(render_firewall(golden_mesh().host(host)))
    result = subprocess.run(["nft", "-c", "-f", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_envoy_units_are_hardened_and_distinct_per_host() -> None:
    mesh = golden_mesh()
    units = {node: _unit(render_envoy_unit(compute_proxy_config(mesh, workload(mesh, node)))) for node in CASES}
    api, db = units["api-vm2-0"]["Service"], units["db-vm2-1"]["Service"]
    assert api["User"] == "mesh-envoy" and "DynamicUser" not in api
    assert "--base-id 1 " in api["ExecStart"] and "--base-id 2 " in db["ExecStart"]
    assert api["ExecStartPre"] == "/usr/local/lib/mesh/envoy --mode validate -c /etc/mesh/proxies/api-0/envoy.yaml"
    for setting in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                    "ProtectKernelModules", "ProtectControlGroups", "LockPersonality", "MemoryDenyWriteExecute",
                    "RestrictNamespaces", "ProtectKernelLogs", "ProtectClock", "ProtectHostname", "RestrictRealtime",
                    "RestrictSUIDSGID"):
        assert api[setting] == "yes", setting
    assert api["ProtectSystem"] == "strict" and api["CapabilityBoundingSet"] == "" and api["AmbientCapabilities"] == ""
    assert api["ProtectProc"] == "invisible" and api["SystemCallFilter"] == "@system-service"
    # Envoy writes nothing but its admin socket: only that folder is writable, each proxy its own.
    assert api["ReadWritePaths"] == "/etc/mesh/proxies/api-0/admin"
    assert db["ReadWritePaths"] == "/etc/mesh/proxies/db-1/admin"
    assert api["Restart"] == "always" and api["LimitNOFILE"] == "65536"
    assert units["api-vm2-0"]["Install"]["WantedBy"] == "multi-user.target"


def test_firewall_unit_is_a_oneshot_before_the_network() -> None:
    unit = _unit(render_firewall_unit())
    assert unit["Service"]["Type"] == "oneshot" and unit["Service"]["RemainAfterExit"] == "yes"
    assert unit["Service"]["ExecStart"] == "/usr/sbin/nft -f /etc/mesh/firewall.nft"
    assert "network-pre.target" in unit["Unit"]["Before"]


def test_rendered_envoy_config_is_the_model() -> None:
    mesh = golden_mesh()
    cfg = compute_proxy_config(mesh, workload(mesh, "web-vm1-0"))
    config = yaml.safe_load(render_envoy_config(cfg))
    resources = config["static_resources"]
    assert [listener["name"] for listener in resources["listeners"]] == ["inbound", "outbound-api", "outbound-report"]
    assert [cluster["name"] for cluster in resources["clusters"]] == ["local-app", "upstream-api", "upstream-report"]
    assert config["admin"]["address"] == {"pipe": {"path": "/etc/mesh/proxies/web-0/admin/admin.sock", "mode": 0o600}}
    api = resources["clusters"][1]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in api["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert addresses == [{"address": "10.0.0.12", "port_value": 21000}, {"address": "10.0.0.13", "port_value": 21000}]
    assert resources["clusters"][2]["type"] == "STRICT_DNS"  # vm4's ansible_host is a name


def test_render_refuses_an_inconsistent_config() -> None:
    mesh = golden_mesh()
    cfg = compute_proxy_config(mesh, workload(mesh, "web-vm1-0"))
    broken = dataclasses.replace(cfg, clusters=cfg.clusters[:1])
    with pytest.raises(InconsistentConfig, match="outbound-api names cluster 'upstream-api'"):
        render_envoy_config(broken)


def test_templates_refuse_undefined_names(tmp_path: Path) -> None:
    (tmp_path / "envoy").mkdir()
    (tmp_path / "envoy" / "t.j2").write_text("{{ missing }}")
    with pytest.raises(Exception, match="missing"):
        template_environment(tmp_path).get_template("envoy/t.j2").render()


def test_config_names_no_key_material() -> None:
    mesh = golden_mesh()
    cfg: ProxyConfig = compute_proxy_config(mesh, workload(mesh, "api-vm2-0"))
    text = render_envoy_config(cfg)
    assert "PRIVATE KEY" not in text and "/etc/mesh/proxies/api-0/tls/key.pem" in text


def _unit(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return {section: dict(parser[section]) for section in parser.sections()}
