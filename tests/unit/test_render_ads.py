"""A proxy on `mesh_delivery: xds` as mesh renders it: envoy-ads.yaml beside envoy.yaml (golden files, checked by
the real Envoy), one metadata digest over both, the unit and the sidecar running Envoy through the start step, and
envoy-ads.yaml kept out of everything that moves resource files (it is the deploy's, like envoy.yaml).

A files proxy renders byte for byte as before: test_render.py's goldens."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from golden_folders import check_golden_folder
from test_plan_changes import converged

from mesh.config import compute_proxy_config, paths
from mesh.config.errors import ConfigError, EnvoyRejectedConfig
from mesh.config.model import ProxyConfig
from mesh.config.validate import throwaway_tls_files
from mesh.config.xds import XDS_PORT, XdsBootstrap
from mesh.containers import sidecar as sidecar_module
from mesh.containers.image import ENVOY_IN_IMAGE
from mesh.containers.sidecar import bootstrap_sidecar, docker_run_args, sidecar_spec, validate_args
from mesh.controller import protocol
from mesh.controller.snapshot import ProxySnapshot
from mesh.hosts.observe import PathFact
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.inventory.validate import build_mesh
from mesh.plan.build import FILE_EFFECT, PlanInputs, build_plan
from mesh.plan.changes import host_changes, observe_request
from mesh.render import (
    FileKind,
    ProxyFiles,
    envoy_start_script,
    host_validation,
    render_envoy_unit,
    render_proxy_files,
    static_bootstrap,
    transition,
    validate_proxy_files,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
INVENTORY = GOLDEN / "envoy" / "input" / "inventory.yaml"
CONTAINERS = GOLDEN / "containers" / "input" / "inventory.yaml"
TRUST_DOMAIN_ID = "spiffe://golden.internal/mesh/controller"
XDS = XdsBootstrap(("10.0.5.1", "10.0.5.2"), XDS_PORT, "controller.golden.internal", TRUST_DOMAIN_ID)
XDS_NAMED = XdsBootstrap(("10.0.5.1", "ctl2.golden.internal"), XDS_PORT, "controller.golden.internal",
                         TRUST_DOMAIN_ID)


def _mesh(inventory: Path) -> Mesh:
    return build_mesh(load_inventory(str(inventory)), str(inventory))


def _config(host: str, service: str, xds: XdsBootstrap | None = XDS, inventory: Path = INVENTORY) -> ProxyConfig:
    mesh = _mesh(inventory)
    workload = next(w for w in mesh.workloads if (w.host, w.service) == (host, service))
    return replace(compute_proxy_config(mesh, workload), xds=xds)


def _yaml(text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def web() -> ProxyFiles:
    return render_proxy_files(_config("vm1", "web"))


# --- goldens ---

@pytest.mark.parametrize(("case", "host", "service", "xds"), [
    ("xds-web-vm1", "vm1", "web", XDS),
    ("xds-db-vm2-named-controller", "vm2", "db", XDS_NAMED),
])
def test_xds_proxy_files_golden(case: str, host: str, service: str, xds: XdsBootstrap, update_goldens: bool) -> None:
    """Every file of an xds proxy, envoy-ads.yaml included (one folder per case, as test_render.py's)."""
    check_golden_folder(render_proxy_files(_config(host, service, xds)), GOLDEN / "envoy" / case, update_goldens)


def test_xds_unit_golden(update_goldens: bool) -> None:
    text = render_envoy_unit(_config("vm1", "web"))
    path = GOLDEN / "systemd" / "xds-web-vm1.service"
    if update_goldens:
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"


# --- envoy-ads.yaml ---

def test_the_ads_bootstrap_comes_right_before_envoy_yaml_and_names_every_controller_first(web: ProxyFiles) -> None:
    kinds = [file.kind for file in web.files]
    assert kinds[-2:] == ["ads-bootstrap", "bootstrap"] and kinds.count("ads-bootstrap") == 1
    ads = web.ads_bootstrap
    assert ads is not None and ads.path == f"{web.proxy_dir}/envoy-ads.yaml"
    assert ads.content.splitlines()[0] == "# mesh-xds-controllers: 10.0.5.1:15012 10.0.5.2:15012"


def test_both_bootstraps_carry_one_digest_over_both_unmarked_texts(web: ProxyFiles) -> None:
    ads = web.ads_bootstrap
    assert ads is not None
    files_node, ads_node = _yaml(web.bootstrap.content)["node"], _yaml(ads.content)["node"]
    assert files_node["metadata"] == {"mesh_bootstrap_sha256": web.bootstrap_sha256}
    assert ads_node["metadata"] == {"mesh_bootstrap_sha256": web.bootstrap_sha256, "mesh_delivery": "xds"}

    def unmarked(text: str) -> str:  # the metadata block (comment, key, digest, delivery) left out
        return re.sub(r"\n  # The sha256[^\n]*\n  metadata:\n(    [^\n]*\n)+", "\n", text)

    assert hashlib.sha256((unmarked(web.bootstrap.content) + unmarked(ads.content)).encode()).hexdigest() \
        == web.bootstrap_sha256
    files_only = render_proxy_files(_config("vm1", "web", xds=None))
    assert files_only.ads_bootstrap is None and files_only.bootstrap_sha256 != web.bootstrap_sha256
    # a change of the controllers changes both files: the deploy restarts the proxy for either
    moved = render_proxy_files(_config("vm1", "web", replace(XDS, controllers=("10.0.5.1",))))
    assert moved.bootstrap.sha256 != web.bootstrap.sha256


def test_the_ads_bootstrap_shares_node_admin_stats_and_overload_with_envoy_yaml(web: ProxyFiles) -> None:
    ads = web.ads_bootstrap
    assert ads is not None
    files, streamed = _yaml(web.bootstrap.content), _yaml(ads.content)
    for section in ("admin", "stats_config", "overload_manager"):
        assert streamed[section] == files[section]
    assert {key: value for key, value in streamed["node"].items() if key != "metadata"} \
        == {key: value for key, value in files["node"].items() if key != "metadata"}


def test_the_ads_stream_goes_to_every_controller_over_mtls_with_the_proxys_file_secrets(web: ProxyFiles) -> None:
    ads = web.ads_bootstrap
    assert ads is not None
    config = _yaml(ads.content)
    dynamic = config["dynamic_resources"]
    assert dynamic["lds_config"] == dynamic["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    stream = dynamic["ads_config"]
    assert (stream["api_type"], stream["transport_api_version"], stream["set_node_on_first_message_only"]) \
        == ("GRPC", "V3", True)
    assert stream["grpc_services"] == [{"envoy_grpc": {"cluster_name": "mesh-xds", "retry_policy": {
        "retry_back_off": {"base_interval": "0.5s", "max_interval": "10s"}}}}]
    [cluster] = config["static_resources"]["clusters"]
    assert (cluster["name"], cluster["type"]) == ("mesh-xds", "STATIC")
    endpoints = [item["endpoint"]["address"]["socket_address"]
                 for item in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert endpoints == [{"address": "10.0.5.1", "port_value": 15012}, {"address": "10.0.5.2", "port_value": 15012}]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "controller.golden.internal"
    context = tls["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    assert context["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] \
        == [{"san_type": "URI", "matcher": {"exact": TRUST_DOMAIN_ID}}]
    xds = f"{web.proxy_dir}/xds"
    sources = [context["tls_certificate_sds_secret_configs"][0],
               context["combined_validation_context"]["validation_context_sds_secret_config"]]
    for source in sources:  # the same secret files envoy.yaml's resources read
        path = source["sds_config"]["path_config_source"]["path"]
        assert path == f"{xds}/sds.{source['name']}.yaml" and web.file(path).kind == "secret"


def test_a_controller_named_by_host_name_makes_the_cluster_resolve_names() -> None:
    ads = render_proxy_files(_config("vm1", "web", XDS_NAMED)).ads_bootstrap
    assert ads is not None
    assert _yaml(ads.content)["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    assert ads.content.startswith("# mesh-xds-controllers: 10.0.5.1:15012 ctl2.golden.internal:15012\n")


@pytest.mark.parametrize("address", ["", "10.0.0.1 10.0.0.2", "$(reboot)", "ctl;id", "-x"])
def test_a_controller_address_the_start_step_could_not_read_back_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="controller address"):
        render_proxy_files(_config("vm1", "web", replace(XDS, controllers=(address,))))
    with pytest.raises(ConfigError, match="needs a controller"):
        render_proxy_files(_config("vm1", "web", replace(XDS, controllers=())))


# --- Envoy's check ---

def test_envoy_validates_both_bootstraps_of_an_xds_proxy(web: ProxyFiles) -> None:
    validate_proxy_files(web, throwaway_tls_files()["trusted_ca"])
    validate_proxy_files(render_proxy_files(_config("vm2", "db", XDS_NAMED)), throwaway_tls_files()["trusted_ca"])


@pytest.mark.parametrize(("before", "after", "reason"), [
    ("lb_policy: RANDOM", "lb_policy: NOT_A_POLICY", "unknown enum value"),
    ("/xds/sds.", "/xds/missing.", "does not exist"),
])
def test_envoy_refuses_a_broken_ads_bootstrap_naming_it(web: ProxyFiles, before: str, after: str, reason: str) -> None:
    broken = replace(web, files=tuple(replace(file, content=file.content.replace(before, after))
                                      if file.kind == "ads-bootstrap" else file for file in web.files))
    with pytest.raises(EnvoyRejectedConfig, match=f"refused envoy-ads.yaml: .*{reason}"):
        validate_proxy_files(broken, throwaway_tls_files()["trusted_ca"])


# --- deploy-owned, like envoy.yaml ---

def test_every_file_kind_has_an_effect_and_a_new_ads_bootstrap_restarts() -> None:
    assert set(FILE_EFFECT) == set(get_args(FileKind))
    assert FILE_EFFECT["ads-bootstrap"] == "restart"


def test_moving_files_keeps_the_ads_bootstrap_with_the_bootstraps(web: ProxyFiles) -> None:
    static = static_bootstrap(web, dynamic=False)  # the static equivalent ignores it (not a resource file)
    assert "ads_config" not in str(static)
    steps = transition(web, {})
    assert [file.kind for file in steps][-2:] == ["ads-bootstrap", "bootstrap"]
    plan = host_validation(web, steps)
    assert plan.moves[-2][1] == f"{web.proxy_dir}/envoy-ads.yaml"


def test_the_controller_never_moves_the_ads_bootstrap(web: ProxyFiles) -> None:
    snapshot = ProxySnapshot("vm1", web, "key")
    assert "envoy-ads.yaml" not in snapshot.xds and "envoy.yaml" not in snapshot.xds
    with pytest.raises(protocol.CtlProtocolError, match="the bootstrap is the deploy's"):
        protocol.bundle_for(web, [f"{web.proxy_dir}/envoy-ads.yaml"])


# --- the unit and the sidecar run Envoy through the start step ---

def test_the_unit_of_an_xds_proxy_runs_envoy_through_the_start_step() -> None:
    files_unit = render_envoy_unit(_config("vm1", "web", xds=None))
    xds_unit = render_envoy_unit(_config("vm1", "web"))
    exec_start = next(line for line in xds_unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[:3] == ["ExecStart=/usr/local/lib/mesh/envoy-start", "/etc/mesh/proxies/web-8080",
                                      "/usr/local/lib/mesh/envoy"]
    assert " -c " not in exec_start  # the start step chooses the bootstrap
    files_start = next(line for line in files_unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[3:] == files_start.split()[3:]  # the same Envoy options
    assert f"ReadWritePaths={paths.admin_dir('web-8080')}" in xds_unit  # where the start step writes `delivery`


def test_an_xds_sidecar_runs_the_start_step_mounted_read_only_with_the_same_envoy_options() -> None:
    mesh = _mesh(CONTAINERS)
    host = next(host for host in mesh.hosts if host.kind == "container_host" and host.workloads)
    workload = host.workloads[0]
    files_spec = sidecar_spec(host, workload, "mesh-envoy:abc", "hash")
    xds_spec = sidecar_spec(host, workload, "mesh-envoy:abc", "hash", xds=True)
    files_args, xds_args = docker_run_args(files_spec), docker_run_args(xds_spec)
    start = "/usr/local/lib/mesh/envoy-start"
    assert xds_args[xds_args.index("--entrypoint") + 1] == start
    assert f"{start}:{start}:ro" in xds_args
    proxy_dir = paths.proxy_dir(files_spec.proxy)
    after_image = xds_args[xds_args.index("mesh-envoy:abc") + 1:]
    assert after_image[:2] == [proxy_dir, ENVOY_IN_IMAGE]
    assert after_image[2:] == files_args[files_args.index("mesh-envoy:abc") + 3:]  # files: image -c envoy.yaml
    assert f"{paths.admin_dir(files_spec.proxy)}:{paths.admin_dir(files_spec.proxy)}:rw" in xds_args
    assert xds_spec.revision != files_spec.revision
    assert "--entrypoint" not in files_args and start not in " ".join(files_args)
    assert f"{start}:{start}:ro" not in validate_args(xds_spec)  # the check runs Envoy alone



def test_a_new_start_step_replaces_xds_sidecars_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The start step is a single-file mount (a replaced file stays the old one in a running container): its
    content is in an xds sidecar's revision, and nowhere in a files sidecar's."""
    mesh = _mesh(CONTAINERS)
    host = next(host for host in mesh.hosts if host.kind == "container_host" and host.workloads)
    workload = host.workloads[0]

    def revisions() -> tuple[str, str]:
        return (bootstrap_sidecar(host, workload, "mesh-envoy:abc", "/b", "0" * 64).revision,
                bootstrap_sidecar(host, workload, "mesh-envoy:abc", "/b", "0" * 64, xds=True).revision)

    files_before, xds_before = revisions()
    monkeypatch.setattr(sidecar_module, "envoy_start_script", lambda: "#!/bin/sh\nexit 1\n")
    files_after, xds_after = revisions()
    assert files_after == files_before and xds_after != xds_before


def test_the_plan_installs_the_start_step_on_xds_hosts_only() -> None:
    inventory = Path(__file__).resolve().parents[1] / "inventories" / "good" / "43-mesh-delivery-yaml" / "hosts.yaml"
    plan = build_plan(_mesh(inventory), PlanInputs(b"root", "00:11", envoy_sha256="0" * 64))
    seen = {}
    for host in plan.hosts:
        for proxy in host.proxies:
            start = next((item for item in host.files if item.path == "/usr/local/lib/mesh/envoy-start"), None)
            ads = next((item for item in proxy.files if item.path.endswith("/envoy-ads.yaml")), None)
            assert proxy.unit is not None
            runs_start = "ExecStart=/usr/local/lib/mesh/envoy-start " in proxy.unit.content.decode()
            seen[host.name] = (host.host.delivery, start is not None, ads is not None, runs_start)
            if start is not None:
                assert (start.mode, start.owner, start.group, start.content) \
                    == (0o755, "root", "root", envoy_start_script().encode())
            if ads is not None:
                assert ads.effect == "restart"
    assert seen == {"vm1": ("xds", True, True, True), "vm2": ("files", False, False, False),
                    "vm3": ("xds", True, True, True)}


def test_a_proxy_back_on_files_loses_what_xds_left_in_its_folder() -> None:
    """vm2's proxy is on files: an envoy-ads.yaml and a delivery marker in its folder (from when it was on xds)
    are observed and removed by the deploy's cleanup; vm3's (on xds) are its own."""
    inventory = Path(__file__).resolve().parents[1] / "inventories" / "good" / "43-mesh-delivery-yaml" / "hosts.yaml"
    plans = {host.name: host for host in build_plan(_mesh(inventory), PlanInputs(b"root", "00:11",
                                                                                  envoy_sha256="0" * 64)).hosts}
    leftovers = ["/etc/mesh/proxies/api-9090/envoy-ads.yaml", "/etc/mesh/proxies/api-9090/admin/delivery"]
    for name, removed in (("vm2", leftovers), ("vm3", [])):
        plan = plans[name]
        assert set(leftovers) <= set(observe_request(plan).paths)
        facts = converged(plan)
        facts = replace(facts, paths={**facts.paths, **{path: PathFact(path, "file", 0o640, "root", "root", "0", "0",
                                                                       "a" * 64) for path in leftovers}})
        changes = host_changes(plan, facts, lambda *_args: None)
        assert [change.subject for change in changes if change.action == "remove"] == removed
