"""Golden files for what mesh renders: each proxy's Envoy files (bootstrap and xDS resource files), systemd units,
nftables tables (tests/golden/), and the pure parts of moving a proxy's files into place.

The input is tests/golden/envoy/input/inventory.yaml; `pytest --update-goldens` rewrites the outputs.
"""

from __future__ import annotations

import configparser
import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.config import EnvoyRejectedConfig, InconsistentConfig, compute_proxy_config, paths
from mesh.config.model import Endpoint, ProxyConfig
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh, Workload
from mesh.inventory.validate import build_mesh
from mesh.render import (
    ProxyFiles,
    RenderedFile,
    host_validation,
    render_envoy_unit,
    render_firewall,
    render_firewall_unit,
    render_proxy_files,
    resources_version,
    stale_paths,
    static_bootstrap,
    template_environment,
    transition,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
INVENTORY = GOLDEN / "envoy" / "input" / "inventory.yaml"
# (host, service) -> the case it stands for
CASES = {
    ("vm1", "web"): "web-vm1-http-upstream",
    ("vm2", "api"): "api-vm2-tcp-upstream",
    ("vm2", "db"): "db-vm2-tcp-health",
    ("vm3", "api"): "api-vm3-two-on-host",
    ("vm3", "pricing"): "pricing-vm3-grpc",
    ("vm4", "report"): "report-vm4-no-upstreams",
}
CASE_IDS = [f"{host}-{service}" for host, service in CASES]


def golden_mesh() -> Mesh:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))


def workload(mesh: Mesh, case: tuple[str, str]) -> Workload:
    return next(w for w in mesh.workloads if (w.host, w.service) == case)


def proxy_files(case: tuple[str, str]) -> ProxyFiles:
    mesh = golden_mesh()
    return render_proxy_files(compute_proxy_config(mesh, workload(mesh, case)))


def resources(files: ProxyFiles, name: str) -> list[dict[str, Any]]:
    """The resources of the proxy's xds file `name` (e.g. "cds.yaml")."""
    return list(yaml.safe_load(files.file(f"{files.proxy_dir}/xds/{name}").content)["resources"])


def check_golden(path: Path, text: str, update: bool) -> None:
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"


def test_every_workload_is_a_case() -> None:
    assert sorted((w.host, w.service) for w in golden_mesh().workloads) == sorted(CASES)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_proxy_files_golden(case: tuple[str, str], update_goldens: bool) -> None:
    """One folder per case, the proxy's files at their paths below the proxy folder (envoy.yaml, xds/...)."""
    files = proxy_files(case)
    folder = GOLDEN / "envoy" / CASES[case]
    rendered = {file.path[len(files.proxy_dir) + 1:]: file.content for file in files.files}
    for relative, content in rendered.items():
        check_golden(folder / relative, content, update_goldens)
    kept = {str(path.relative_to(folder)) for path in folder.rglob("*.yaml")}
    if update_goldens:
        for stale in kept - set(rendered):
            (folder / stale).unlink()
    else:
        assert kept == set(rendered), f"{folder} holds files mesh no longer renders: run pytest --update-goldens"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_envoy_unit_golden(case: tuple[str, str], update_goldens: bool) -> None:
    mesh = golden_mesh()
    text = render_envoy_unit(compute_proxy_config(mesh, workload(mesh, case)))
    check_golden(GOLDEN / "systemd" / f"{CASES[case]}.service", text, update_goldens)


@pytest.mark.parametrize("host", ["ctl1", "vm1", "vm2", "vm3", "vm4"])
def test_firewall_golden(host: str, update_goldens: bool) -> None:
    check_golden(GOLDEN / "nftables" / f"{host}.nft", render_firewall(golden_mesh().host(host), golden_mesh().metrics_sources), update_goldens)


def test_firewall_unit_golden(update_goldens: bool) -> None:
    check_golden(GOLDEN / "systemd" / "mesh-firewall.service", render_firewall_unit(), update_goldens)


def test_firewall_drops_only_app_ports_off_loopback() -> None:
    text = render_firewall(golden_mesh().host("vm2"), golden_mesh().metrics_sources)
    rules = [line.strip() for line in text.splitlines() if line.startswith("\t\t") and not line.strip().startswith("#")]
    # nothing else: SSH untouched; metrics ports from the metrics sources only (here the controller)
    assert rules[1:] == ['iif "lo" accept', "tcp dport { 20000, 20001 } ip saddr { 10.0.0.3 } accept",
                         "tcp dport { 20000, 20001 } drop", "tcp dport { 5432, 9090 } drop"]
    assert text.index("table inet mesh\n") < text.index("delete table inet mesh") < text.index("table inet mesh {")


def test_firewall_of_a_host_without_workloads_is_an_empty_table() -> None:
    text = render_firewall(golden_mesh().host("ctl1"), golden_mesh().metrics_sources)
    assert "chain" not in text and "table inet mesh {\n}" in text


@pytest.mark.parametrize("host", ["ctl1", "vm2"])
def test_firewall_parses_with_nft_check_mode(host: str, tmp_path: Path) -> None:
    script = tmp_path / "firewall.nft"
    script.write_text(render_firewall(golden_mesh().host(host), golden_mesh().metrics_sources))
    result = subprocess.run(["nft", "-c", "-f", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_envoy_units_are_hardened_and_distinct_per_host() -> None:
    mesh = golden_mesh()
    configs = {case: compute_proxy_config(mesh, workload(mesh, case)) for case in CASES}
    units = {case: _unit(render_envoy_unit(cfg)) for case, cfg in configs.items()}
    api, db = units[("vm2", "api")]["Service"], units[("vm2", "db")]["Service"]
    api_cfg, db_cfg = configs[("vm2", "api")], configs[("vm2", "db")]
    assert api["User"] == paths.envoy_user(api_cfg.proxy) != db["User"] and "DynamicUser" not in api
    assert f"--base-id {api_cfg.base_id} " in api["ExecStart"] and f"--base-id {db_cfg.base_id} " in db["ExecStart"]
    assert api_cfg.base_id != db_cfg.base_id
    # Envoy starts from the bootstrap in the proxy's folder (it reads the rest from xds/ there)
    assert api["ExecStartPre"] == f"/usr/local/lib/mesh/envoy --mode validate -c {api_cfg.config_path}"
    assert api_cfg.config_path == f"/etc/mesh/proxies/{api_cfg.proxy}/envoy.yaml"
    for setting in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                    "ProtectKernelModules", "ProtectControlGroups", "LockPersonality", "MemoryDenyWriteExecute",
                    "RestrictNamespaces", "ProtectKernelLogs", "ProtectClock", "ProtectHostname", "RestrictRealtime",
                    "RestrictSUIDSGID"):
        assert api[setting] == "yes", setting
    assert api["ProtectSystem"] == "strict" and api["CapabilityBoundingSet"] == "" and api["AmbientCapabilities"] == ""
    assert api["ProtectProc"] == "invisible" and api["SystemCallFilter"] == "@system-service"
    # Envoy writes nothing but its admin socket: only that folder is writable, each proxy its own.
    assert api["ReadWritePaths"] == f"/etc/mesh/proxies/{api_cfg.proxy}/admin"
    assert db["ReadWritePaths"] == f"/etc/mesh/proxies/{db_cfg.proxy}/admin"
    assert api["Restart"] == "always" and api["LimitNOFILE"] == "65536"
    assert units[("vm2", "api")]["Install"]["WantedBy"] == "multi-user.target"


def test_firewall_unit_is_a_oneshot_before_the_network() -> None:
    unit = _unit(render_firewall_unit())
    assert unit["Service"]["Type"] == "oneshot" and unit["Service"]["RemainAfterExit"] == "yes"
    assert unit["Service"]["ExecStart"] == "/usr/sbin/nft -f /etc/mesh/firewall.nft"
    assert "network-pre.target" in unit["Unit"]["Before"]


def test_rendered_files_are_the_model() -> None:
    files = proxy_files(("vm1", "web"))
    xds = f"/etc/mesh/proxies/{files.proxy}/xds"
    assert [file.path for file in files.files] == [  # the order they are moved in: what is named first
        f"{xds}/sds.proxy-cert.yaml", f"{xds}/sds.mesh-ca.yaml",
        f"{xds}/eds.local-app.yaml", f"{xds}/eds.upstream-api.yaml", f"{xds}/eds.upstream-api.v1.yaml",
        f"{xds}/eds.upstream-api.v2.yaml", f"{xds}/cds.yaml",
        f"{xds}/rds.inbound-health.yaml", f"{xds}/rds.inbound.yaml", f"{xds}/rds.outbound-api.yaml",
        f"{xds}/rds.outbound-report.yaml", f"{xds}/lds.yaml", f"/etc/mesh/proxies/{files.proxy}/envoy.yaml"]
    assert [file.kind for file in files.files] == ["secret"] * 2 + ["resource"] * 10 + ["bootstrap"]
    assert [listener["name"] for listener in resources(files, "lds.yaml")] == ["inbound", "outbound-api",
                                                                               "outbound-report", "metrics"]
    clusters = {cluster["name"]: cluster for cluster in resources(files, "cds.yaml")}
    # api runs two versions (v1 on vm2, v2 on vm3): a cluster of each besides the one of every instance
    assert list(clusters) == ["local-app", "upstream-api", "upstream-api.v1", "upstream-api.v2", "upstream-report",
                              "mesh-admin"]
    # the metrics listener's way to the admin socket
    assert clusters["mesh-admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] \
        == {"pipe": {"path": f"/etc/mesh/proxies/{files.proxy}/admin/admin.sock"}}
    # IP addresses come through EDS (their own file); vm4's ansible_host is a name: STRICT_DNS, inline
    assert clusters["upstream-api"]["type"] == "EDS" and "load_assignment" not in clusters["upstream-api"]
    assert clusters["upstream-report"]["type"] == "STRICT_DNS"
    assert clusters["upstream-report"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] \
        == {"socket_address": {"address": "vm4.golden.internal", "port_value": 21000}}
    (assignment,) = resources(files, "eds.upstream-api.yaml")
    addresses = [e["endpoint"]["address"]["socket_address"] for e in assignment["endpoints"][0]["lb_endpoints"]]
    assert addresses == [{"address": "10.0.0.12", "port_value": 21000}, {"address": "10.0.0.13", "port_value": 21000}]
    bootstrap = yaml.safe_load(files.bootstrap.content)
    # no resource in it
    assert set(bootstrap) == {"node", "admin", "overload_manager", "dynamic_resources", "stats_config"}
    assert bootstrap["node"]["metadata"] == {"mesh_bootstrap_sha256": files.bootstrap_sha256}
    assert bootstrap["admin"]["address"] == {"pipe": {"path": f"/etc/mesh/proxies/{files.proxy}/admin/admin.sock",
                                                      "mode": 0o600}}
    assert bootstrap["dynamic_resources"]["lds_config"]["path_config_source"] == {
        "path": f"{xds}/lds.yaml", "watched_directory": {"path": xds}}


def test_each_file_says_the_version_of_its_resources() -> None:
    files = proxy_files(("vm1", "web"))
    for file in files.files[:-1]:
        parsed = yaml.safe_load(file.content)
        assert parsed["version_info"] == resources_version(parsed["resources"]), file.path


def test_secrets_are_files_envoy_watches_for_a_swapped_tls_link_and_ca() -> None:
    files = proxy_files(("vm2", "api"))
    folder = f"/etc/mesh/proxies/{files.proxy}"
    (certificate,) = resources(files, "sds.proxy-cert.yaml")
    assert certificate["tls_certificate"] == {"certificate_chain": {"filename": f"{folder}/tls/cert.pem"},
                                              "private_key": {"filename": f"{folder}/tls/key.pem"},
                                              "watched_directory": {"path": folder}}
    (bundle,) = resources(files, "sds.mesh-ca.yaml")
    assert bundle["validation_context"] == {"trusted_ca": {"filename": f"{folder}/ca.pem"},
                                            "watched_directory": {"path": folder}}
    # listeners and clusters name them through SDS from those files, never static secrets
    for name in ("lds.yaml", "cds.yaml"):
        text = files.file(f"{folder}/xds/{name}").content
        assert f"path: {folder}/xds/sds.proxy-cert.yaml" in text and f"path: {folder}/xds/sds.mesh-ca.yaml" in text


def changed_endpoints(cfg: ProxyConfig, cluster: str, *endpoints: Endpoint) -> ProxyConfig:
    changed = dataclasses.replace(cfg.cluster(cluster), endpoints=endpoints)
    return dataclasses.replace(cfg, clusters=tuple(changed if c.name == cluster else c for c in cfg.clusters))


def test_an_endpoint_change_is_one_file_and_keeps_the_bootstrap() -> None:
    mesh = golden_mesh()
    cfg = compute_proxy_config(mesh, workload(mesh, ("vm1", "web")))
    before = render_proxy_files(cfg)
    after = render_proxy_files(changed_endpoints(cfg, "upstream-api", Endpoint("10.0.0.99", 21000)))
    on_host = {file.path: file.sha256 for file in before.files}
    assert [file.path for file in transition(after, on_host)] == [f"{after.proxy_dir}/xds/eds.upstream-api.yaml"]
    assert after.bootstrap_sha256 == before.bootstrap_sha256  # no restart
    assert transition(before, on_host) == ()  # nothing differs: nothing moves
    bigger = render_proxy_files(dataclasses.replace(cfg, max_downstream_connections=60_000))
    assert bigger.bootstrap_sha256 != before.bootstrap_sha256
    assert [file.kind for file in transition(bigger, on_host)] == ["bootstrap"]


def test_a_cluster_that_leaves_is_kept_until_the_routes_stop_naming_it() -> None:
    mesh = golden_mesh()
    cfg = compute_proxy_config(mesh, workload(mesh, ("vm1", "web")))
    before = render_proxy_files(cfg)
    # web loses its `report` upstream: its listener, route, cluster go
    after = render_proxy_files(dataclasses.replace(cfg, outbound=cfg.outbound[:1], clusters=cfg.clusters[:-1]))
    on_host = {file.path: file.sha256 for file in before.files}
    cds = before.file(f"{before.proxy_dir}/xds/cds.yaml")
    steps = transition(after, on_host, cds.content)
    xds = f"{after.proxy_dir}/xds"
    assert [file.path for file in steps] == [f"{xds}/cds.yaml", f"{xds}/lds.yaml", f"{xds}/cds.yaml"]
    kept = [cluster["name"] for cluster in yaml.safe_load(steps[0].content)["resources"]]
    # the new ones, then the one that leaves
    assert kept == ["local-app", "upstream-api", "upstream-api.v1", "upstream-api.v2", "mesh-admin", "upstream-report"]
    assert steps[2] == after.file(f"{xds}/cds.yaml")
    assert stale_paths(after, on_host) == (f"{xds}/rds.outbound-report.yaml",)
    # without the host's cds.yaml, mesh cannot know what leaves: the plain order
    assert [file.path for file in transition(after, on_host)] == [f"{xds}/cds.yaml", f"{xds}/lds.yaml"]


def test_host_validation_stages_checks_then_installs(tmp_path: Path) -> None:
    mesh = golden_mesh()
    cfg = compute_proxy_config(mesh, workload(mesh, ("vm1", "web")))
    before, after = render_proxy_files(cfg), render_proxy_files(dataclasses.replace(
        cfg, outbound=cfg.outbound[:1], clusters=cfg.clusters[:-1]))
    on_host = {file.path: file.sha256 for file in before.files}
    steps = transition(after, on_host, before.file(f"{before.proxy_dir}/xds/cds.yaml").content)
    plan = host_validation(after, steps, stale_paths(after, on_host), user="mesh-web-8080")
    staging = f"{after.proxy_dir}/.staging"
    assert plan.staging_dir == staging
    assert plan.moves == ((f"{staging}/xds/cds.yaml", f"{after.proxy_dir}/xds/cds.yaml"),
                          (f"{staging}/xds/lds.yaml", f"{after.proxy_dir}/xds/lds.yaml"),
                          (f"{staging}/xds/cds.yaml.next", f"{after.proxy_dir}/xds/cds.yaml"))
    assert [file.path for file in plan.staged] == [staged for staged, _ in plan.moves]
    assert plan.command == (f"runuser -u mesh-web-8080 -- /usr/local/lib/mesh/envoy --mode validate -c "
                            f"{staging}/validate.yaml --disable-hot-restart --log-level error")
    assert host_validation(after).command.startswith(f"runuser -u {paths.envoy_user(after.proxy)} -- ")
    assert host_validation(after, user=None).command.startswith("/usr/local/lib/mesh/envoy --mode validate")
    checked = yaml.safe_load(plan.config)
    assert "dynamic_resources" not in checked  # the staged xds files need not exist for the check
    assert [s["name"] for s in checked["static_resources"]["secrets"]] == ["proxy-cert", "mesh-ca"]
    script = tmp_path / "install.sh"
    script.write_text(plan.install)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    lines = plan.install.splitlines()
    moves = [line for line in lines if line.startswith("mv -f")]
    assert len(moves) == 3 and lines[-1] == f"rm -f -- {after.proxy_dir}/xds/rds.outbound-report.yaml"
    assert any(line.startswith("wait_for cluster_manager.cds.version_text") for line in lines)


def test_host_validation_golden(update_goldens: bool) -> None:
    """The check and install of web's files on vm1 when its `report` upstream leaves (cds.yaml moved twice)."""
    mesh = golden_mesh()
    cfg = compute_proxy_config(mesh, workload(mesh, ("vm1", "web")))
    before, after = render_proxy_files(cfg), render_proxy_files(dataclasses.replace(
        cfg, outbound=cfg.outbound[:1], clusters=cfg.clusters[:-1]))
    on_host = {file.path: file.sha256 for file in before.files}
    steps = transition(after, on_host, before.file(f"{before.proxy_dir}/xds/cds.yaml").content)
    plan = host_validation(after, steps, stale_paths(after, on_host))
    folder = GOLDEN / "envoy" / "host-validation"
    check_golden(folder / "install.sh", f"# {plan.command}\n" + plan.install, update_goldens)
    check_golden(folder / "validate.yaml", plan.config, update_goldens)


def test_static_bootstrap_refuses_a_file_envoy_would_not_read() -> None:
    files = proxy_files(("vm1", "web"))
    rds = files.file(f"{files.proxy_dir}/xds/rds.outbound-api.yaml")
    renamed = RenderedFile(rds.path, rds.content.replace("name: outbound-api", "name: elsewhere"), rds.kind)
    with pytest.raises(EnvoyRejectedConfig, match="must hold exactly the resource 'outbound-api'"):
        static_bootstrap(dataclasses.replace(files, files=tuple(renamed if f is rds else f for f in files.files)))
    without = dataclasses.replace(files, files=tuple(f for f in files.files if f is not rds))
    with pytest.raises(EnvoyRejectedConfig, match="rds.outbound-api.yaml, which is not one of the proxy's files"):
        static_bootstrap(without)
    config = static_bootstrap(files)
    outbound = config["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "rds" not in outbound and outbound["route_config"]["name"] == "outbound-api"


def test_render_refuses_an_inconsistent_config() -> None:
    mesh = golden_mesh()
    cfg = compute_proxy_config(mesh, workload(mesh, ("vm1", "web")))
    broken = dataclasses.replace(cfg, clusters=cfg.clusters[:1])
    with pytest.raises(InconsistentConfig, match="outbound-api names cluster 'upstream-api'"):
        render_proxy_files(broken)


def test_templates_refuse_undefined_names(tmp_path: Path) -> None:
    (tmp_path / "envoy").mkdir()
    (tmp_path / "envoy" / "t.j2").write_text("{{ missing }}")
    with pytest.raises(Exception, match="missing"):
        template_environment(tmp_path).get_template("envoy/t.j2").render()


def test_files_name_no_key_material() -> None:
    files = proxy_files(("vm2", "api"))
    assert all("PRIVATE KEY" not in file.content for file in files.files)
    assert f"/etc/mesh/proxies/{files.proxy}/tls/key.pem" in files.file(
        f"{files.proxy_dir}/xds/sds.proxy-cert.yaml").content


def _unit(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return {section: dict(parser[section]) for section in parser.sections()}
