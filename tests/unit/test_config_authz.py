"""A service's authorization as Envoy config (mesh.config.inbound, compute.py, the templates, render.py): the DENY
then ALLOW RBAC filters of the inbound app chain (HTTP: per-route config in the inbound route; TCP: network
filters read from ECDS files), the plaintext chain of a permissive service, the `authz_shadow` access field; a
change of any rule field rewrites only the inbound route (HTTP) or the ECDS files (TCP), while mtls changes the
listener; one inbound file rendered alone (what the controller does) equals the deploy's byte for byte. Goldens of
rules, shadow rules and permissive HTTP and TCP are in tests/golden/envoy/authz-*.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from golden_folders import check_golden_folder

from mesh.config import InconsistentConfig, compute_proxy_config
from mesh.config.authz import InboundInputs, normalized_path
from mesh.config.model import ProxyConfig
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Protocol, Upstream, Workload
from mesh.inventory.policy import (
    AuthzOverride,
    AuthzRule,
    AuthzRules,
    PathMatch,
    RateLimit,
    ServicePolicy,
)
from mesh.render import (
    ProxyFiles,
    host_validation,
    inbound_files,
    render_inbound_file,
    render_proxy_files,
    stale_paths,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "envoy"
TRUST_DOMAIN = "authz.mesh"

# api: web may GET and POST under /orders/ (narrowing web's default); nobody may reach /admin/*; a shadow rule would
# deny web's DELETE; a shadow allow would let `other` in.
API_RULES = AuthzRules(
    allow=(AuthzRule(sources=("web",), methods=("GET", "POST"), paths=(PathMatch("prefix", "/orders/"),
                                                                         PathMatch("exact", "/orders"))),
           AuthzRule(sources=("spiffe://authz.mesh/svc/other",), headers=(("x-tenant", "blue"),), mode="shadow")),
    deny=(AuthzRule(paths=(PathMatch("prefix", "/admin/"),)),
          AuthzRule(sources=("web",), methods=("DELETE",), mode="shadow")),
)
DB_RULES = AuthzRules(
    allow=(AuthzRule(sources=("unauthenticated",)),),
    deny=(AuthzRule(sources=("other",)), AuthzRule(sources=("api",), mode="shadow")),
)


def authz_mesh(policies: dict[str, ServicePolicy] | None = None, default: str = "declared",
               web_upstreams: tuple[str, ...] = ("api", "db")) -> Mesh:
    """web calls api and db (by default), api calls db, `other` calls nothing; db is TCP."""
    ports = {"api": 19001, "db": 19002}

    def workload(host: str, service: str, port: int, protocol: Protocol = "http",
                 upstreams: tuple[str, ...] = ()) -> Workload:
        return Workload(host, 0, service, port, TRUST_DOMAIN, protocol=protocol,
                        upstreams=tuple(Upstream(name, ports[name]) for name in upstreams))

    placed = [("h-web", "10.3.0.1", workload("h-web", "web", 8080, upstreams=web_upstreams)),
              ("h-api", "10.3.0.2", workload("h-api", "api", 9090, upstreams=("db",))),
              ("h-db", "10.3.0.3", workload("h-db", "db", 5432, protocol="tcp")),
              ("h-other", "10.3.0.4", workload("h-other", "other", 7070))]
    hosts = tuple(ManagedHost(name, "vm", Connection(address), (w,)) for name, address, w in placed)
    services = MappingProxyType({w.service: (w,) for *_, w in placed})
    settings = MeshSettings(trust_domain=TRUST_DOMAIN, authz_default=default)  # type: ignore[arg-type]
    return Mesh(settings, hosts, (), services, policies=MappingProxyType(policies or {}))


def config_of(mesh: Mesh, service: str, overrides: dict[str, AuthzOverride] | None = None) -> ProxyConfig:
    workload = next(w for w in mesh.workloads if w.service == service)
    return compute_proxy_config(mesh, workload, authz_overrides=MappingProxyType(overrides or {}))


def files_of(mesh: Mesh, service: str, overrides: dict[str, AuthzOverride] | None = None) -> ProxyFiles:
    return render_proxy_files(config_of(mesh, service, overrides))


def resources(files: ProxyFiles, name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load(files.file(f"{files.proxy_dir}/xds/{name}").content)["resources"])


def inbound_listener(files: ProxyFiles) -> dict[str, Any]:
    return next(item for item in resources(files, "lds.yaml") if item["name"] == "inbound")


def chains(files: ProxyFiles) -> dict[str, dict[str, Any]]:
    return {chain["name"]: chain for chain in inbound_listener(files)["filter_chains"]}


def rbac(files: ProxyFiles) -> dict[str, dict[str, Any]]:
    """filter name -> its RBAC (HTTP: the inbound route's per-route config; TCP: the ECDS file's)."""
    if any(file.path.endswith("/ecds.mesh.authz.deny.yaml") for file in files.files):
        return {name: resources(files, f"ecds.{name}.yaml")[0]["typed_config"]
                for name in ("mesh.authz.deny", "mesh.authz.allow")}
    (route,) = resources(files, "rds.inbound.yaml")
    per_route = route["virtual_hosts"][0]["routes"][0]["typed_per_filter_config"]
    return {name: per_route[name]["rbac"] for name in ("mesh.authz.deny", "mesh.authz.allow")}


def changed(before: ProxyFiles, after: ProxyFiles) -> list[str]:
    old = {file.path: file.content for file in before.files}
    return sorted(file.path.rsplit("/", 1)[-1] for file in after.files if old.get(file.path) != file.content)


# --- what the filters hold ---

def test_the_app_chain_runs_deny_then_allow_before_the_rate_limit_and_the_health_chain_has_none() -> None:
    files = files_of(authz_mesh({"api": ServicePolicy(authz=API_RULES)}), "api")
    found = chains(files)
    assert list(found) == ["health", "app"]  # strict: no plaintext chain
    http_filters = found["app"]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in http_filters] == ["mesh.authz.deny", "mesh.authz.allow",
                                                  "envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]
    # without a route's config the DENY filter denies nothing and the ALLOW filter allows nothing
    assert http_filters[0]["typed_config"]["rules"] == {"action": "DENY"}
    assert http_filters[1]["typed_config"]["rules"] == {"action": "ALLOW"}
    health = found["health"]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in health] == ["envoy.filters.http.health_check", "envoy.filters.http.router"]


def test_the_entries_are_compile_authz_names_in_envoy_form() -> None:
    filters = rbac(files_of(authz_mesh({"api": ServicePolicy(authz=API_RULES)}), "api"))
    deny, allow = filters["mesh.authz.deny"], filters["mesh.authz.allow"]
    assert list(deny["rules"]["policies"]) == ["deny[0]"]
    assert deny["rules"]["policies"]["deny[0]"] == {
        "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
            {"url_path": {"path": {"prefix": "/admin/"}}}]}}]}}],
        # no `from`: every workload and a plaintext client, never the checker
        "principals": [{"or_ids": {"ids": [{"authenticated": {"principal_name": {"prefix": "spiffe://authz.mesh/svc/"}}},
                                           {"not_id": {"authenticated": {}}}]}}]}
    assert list(deny["shadow_rules"]["policies"]) == ["deny[1]"]
    assert deny["rules_stat_prefix"] == deny["shadow_rules_stat_prefix"] == "mesh_authz_deny_"
    assert list(allow["rules"]["policies"]) == ["allow[0]", "default"]
    web = {"authenticated": {"principal_name": {"exact": "spiffe://authz.mesh/svc/web"}}}
    assert allow["rules"]["policies"]["allow[0]"]["permissions"] == [{"and_rules": {"rules": [
        {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                                {"header": {"name": ":method", "string_match": {"exact": "POST"}}}]}},
        {"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/orders/"}}},
                                {"url_path": {"path": {"exact": "/orders"}}}]}}]}}]
    # web is named by an allow rule: the default (its callers: web) leaves it out; a shadow rule changes nothing
    # that is enforced, but the shadow default leaves `other` out too
    other = {"authenticated": {"principal_name": {"exact": "spiffe://authz.mesh/svc/other"}}}
    default = allow["rules"]["policies"]["default"]
    assert default["permissions"] == [{"any": True}]
    (principal,) = default["principals"]
    assert principal["and_ids"]["ids"] == [{"or_ids": {"ids": [web]}}, {"not_id": {"or_ids": {"ids": [web]}}}]
    (shadow_principal,) = allow["shadow_rules"]["policies"]["default"]["principals"]
    assert shadow_principal["and_ids"]["ids"][1] == {"not_id": {"or_ids": {"ids": [other, web]}}}
    # the shadow allow set: the enforced entries and the shadow one, as if enforced
    assert list(allow["shadow_rules"]["policies"]) == ["allow[0]", "allow[1]", "default"]
    assert allow["shadow_rules"]["policies"]["allow[1]"]["permissions"] == [{"and_rules": {"rules": [
        {"header": {"name": "x-tenant", "string_match": {"exact": "blue"}}}]}}]


def test_without_shadow_rules_no_shadow_engine_runs() -> None:
    filters = rbac(files_of(authz_mesh(), "api"))
    assert "shadow_rules" not in filters["mesh.authz.deny"] and "shadow_rules" not in filters["mesh.authz.allow"]
    assert filters["mesh.authz.deny"]["rules"] == {"action": "DENY", "policies": {}}


def test_a_tcp_service_reads_its_filters_from_two_ecds_files_named_by_the_listener() -> None:
    files = files_of(authz_mesh({"db": ServicePolicy(authz=DB_RULES)}), "db")
    filters = chains(files)["app"]["filters"]
    assert [f["name"] for f in filters] == ["mesh.authz.deny", "mesh.authz.allow", "envoy.filters.network.tcp_proxy"]
    for found in filters[:2]:
        source = found["config_discovery"]["config_source"]["path_config_source"]
        assert source["path"] == f"{files.proxy_dir}/xds/ecds.{found['name']}.yaml"
        assert source["watched_directory"]["path"] == f"{files.proxy_dir}/xds"
        assert found["config_discovery"]["type_urls"] == [
            "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"]
    deny = rbac(files)["mesh.authz.deny"]
    assert deny["stat_prefix"] == "mesh_authz_deny." and "rules_stat_prefix" not in deny
    assert list(deny["rules"]["policies"]) == ["deny[0]"] and list(deny["shadow_rules"]["policies"]) == ["deny[1]"]
    allow = rbac(files)["mesh.authz.allow"]["rules"]["policies"]
    assert allow["allow[0]"]["principals"] == [{"or_ids": {"ids": [{"not_id": {"authenticated": {}}}]}}]
    # the default of db: its callers web and api (a plaintext client, named by allow[0], left out)
    (principal,) = allow["default"]["principals"]
    assert [p["authenticated"]["principal_name"]["exact"] for p in principal["and_ids"]["ids"][0]["or_ids"]["ids"]
            ] == ["spiffe://authz.mesh/svc/api", "spiffe://authz.mesh/svc/web"]
    assert principal["and_ids"]["ids"][1] == {"not_id": {"or_ids": {"ids": [{"not_id": {"authenticated": {}}}]}}}


def test_the_inbound_access_line_has_authz_shadow_from_the_filters_metadata() -> None:
    http = dict(config_of(authz_mesh(), "api").inbound.access_log.fields)
    assert dict(http["authz_shadow"]) == {  # type: ignore[arg-type]
        "deny": "%DYNAMIC_METADATA(envoy.filters.http.rbac:mesh_authz_deny_shadow_effective_policy_id)%",
        "allow": "%DYNAMIC_METADATA(envoy.filters.http.rbac:mesh_authz_allow_shadow_engine_result)%"}
    assert http["response_code_details"] == "%RESPONSE_CODE_DETAILS%" and http["mtls"] is True
    tcp = dict(config_of(authz_mesh(), "db").inbound.access_log.fields)
    assert dict(tcp["authz_shadow"])["deny"] == (  # type: ignore[arg-type]
        "%DYNAMIC_METADATA(envoy.filters.network.rbac:mesh_authz_deny_shadow_effective_policy_id)%")
    assert tcp["connection_termination_details"] == "%CONNECTION_TERMINATION_DETAILS%"
    log = inbound_listener(files_of(authz_mesh(), "api"))["filter_chains"][1]["filters"][0]["typed_config"][
        "access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log["authz_shadow"]["allow"].startswith("%DYNAMIC_METADATA(")


# --- permissive ---

@pytest.mark.parametrize("service", ["api", "db"])
def test_permissive_adds_a_plaintext_chain_with_the_same_filters_and_route(service: str) -> None:
    policies = {service: ServicePolicy(mtls="permissive")}
    files = files_of(authz_mesh(policies), service)
    listener = inbound_listener(files)
    assert listener["listener_filters_timeout"] == "1s" and listener["continue_on_listener_filters_timeout"] is True
    found = chains(files)
    assert list(found) == ["health", "app", "plaintext"]
    plaintext, app = found["plaintext"], found["app"]
    assert plaintext["filter_chain_match"] == {"transport_protocol": "raw_buffer"}
    assert "transport_socket" not in plaintext
    names = [f["name"] for f in plaintext["filters"]]
    assert names == [f["name"] for f in app["filters"]]
    if service == "api":
        hcm, tls_hcm = plaintext["filters"][0]["typed_config"], app["filters"][0]["typed_config"]
        assert hcm["forward_client_cert_details"] == "SANITIZE" and "set_current_client_cert_details" not in hcm
        assert hcm["rds"] == tls_hcm["rds"] and hcm["http_filters"] == tls_hcm["http_filters"]
        log = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
    else:
        assert plaintext["filters"][:2] == app["filters"][:2]
        log = plaintext["filters"][2]["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log["mtls"] is False
    # the default lets the plaintext client in (`unauthenticated`) on a permissive service
    default = rbac(files)["mesh.authz.allow"]["rules"]["policies"]["default"]
    assert {"not_id": {"authenticated": {}}} in default["principals"][0]["or_ids"]["ids"]


def test_strict_has_no_plaintext_chain_and_keeps_the_default_listener_filter_timeout() -> None:
    listener = inbound_listener(files_of(authz_mesh(), "api"))
    assert "listener_filters_timeout" not in listener
    assert [chain["name"] for chain in listener["filter_chains"]] == ["health", "app"]


# --- what a change rewrites ---

def _with(service: str, **rules: Any) -> dict[str, ServicePolicy]:
    return {service: ServicePolicy(authz=AuthzRules(**rules))}


HTTP_CHANGES = {
    "allow from": _with("api", allow=(AuthzRule(sources=("other",)),)),
    "allow methods": _with("api", allow=(AuthzRule(sources=("web",), methods=("GET",)),)),
    "allow paths": _with("api", allow=(AuthzRule(sources=("web",), paths=(PathMatch("prefix", "/a/"),)),)),
    "allow headers": _with("api", allow=(AuthzRule(sources=("web",), headers=(("x-a", "1"),)),)),
    "allow shadow": _with("api", allow=(AuthzRule(sources=("other",), mode="shadow"),)),
    "allow any source": _with("api", allow=(AuthzRule(methods=("GET",)),)),
    "allow unauthenticated": _with("api", allow=(AuthzRule(sources=("unauthenticated",)),)),
    "deny from": _with("api", deny=(AuthzRule(sources=("web",)),)),
    "deny by id": _with("api", deny=(AuthzRule(sources=("spiffe://authz.mesh/svc/web",), methods=("PUT",)),)),
    "deny paths": _with("api", deny=(AuthzRule(paths=(PathMatch("exact", "/x"),)),)),
    "deny headers": _with("api", deny=(AuthzRule(headers=(("x-b", "2"),)),)),
    "deny shadow": _with("api", deny=(AuthzRule(sources=("web",), mode="shadow"),)),
    "rate limit": {"api": ServicePolicy(rate_limit=RateLimit(10, 20))},
}


@pytest.mark.parametrize("policies", HTTP_CHANGES.values(), ids=HTTP_CHANGES.keys())
def test_an_http_rule_change_rewrites_only_the_inbound_route(policies: dict[str, ServicePolicy]) -> None:
    assert changed(files_of(authz_mesh(), "api"), files_of(authz_mesh(policies), "api")) == ["rds.inbound.yaml"]


TCP_CHANGES = {
    "allow from": (_with("db", allow=(AuthzRule(sources=("other",)),)), ["ecds.mesh.authz.allow.yaml"]),
    "allow shadow": (_with("db", allow=(AuthzRule(sources=("other",), mode="shadow"),)),
                     ["ecds.mesh.authz.allow.yaml"]),
    "deny from": (_with("db", deny=(AuthzRule(sources=("web",)),)), ["ecds.mesh.authz.deny.yaml"]),
    "deny shadow": (_with("db", deny=(AuthzRule(sources=("web",), mode="shadow"),)), ["ecds.mesh.authz.deny.yaml"]),
    "deny and allow": ({"db": ServicePolicy(authz=DB_RULES)},
                       ["ecds.mesh.authz.allow.yaml", "ecds.mesh.authz.deny.yaml"]),
}


@pytest.mark.parametrize(("policies", "expected"), TCP_CHANGES.values(), ids=TCP_CHANGES.keys())
def test_a_tcp_rule_change_rewrites_only_the_ecds_files(policies: dict[str, ServicePolicy],
                                                        expected: list[str]) -> None:
    assert changed(files_of(authz_mesh(), "db"), files_of(authz_mesh(policies), "db")) == expected


@pytest.mark.parametrize(("service", "expected"), [("api", ["rds.inbound.yaml"]),
                                                   ("db", ["ecds.mesh.authz.deny.yaml"])])
def test_a_run_time_deny_rewrites_only_the_inbound_file(service: str, expected: list[str]) -> None:
    deny = {service: AuthzOverride(("web",), "r1")}
    assert changed(files_of(authz_mesh(), service), files_of(authz_mesh(), service, deny)) == expected
    # a deny of another service changes nothing here
    assert changed(files_of(authz_mesh(), service), files_of(authz_mesh(), service, {"other": deny[service]})) == []


@pytest.mark.parametrize(("service", "expected"), [("api", ["rds.inbound.yaml"]),
                                                   ("db", ["ecds.mesh.authz.allow.yaml"])])
def test_the_mesh_default_and_the_callers_change_only_the_inbound_file(service: str, expected: list[str]) -> None:
    before = files_of(authz_mesh(), service)
    assert changed(before, files_of(authz_mesh(default="allow"), service)) == expected
    assert changed(before, files_of(authz_mesh(default="deny"), service)) == expected
    assert changed(before, files_of(authz_mesh(web_upstreams=()), service)) == expected  # web no longer calls it


@pytest.mark.parametrize("service", ["api", "db"])
def test_mtls_changes_the_listener(service: str) -> None:
    before = files_of(authz_mesh(), service)
    after = files_of(authz_mesh({service: ServicePolicy(mtls="permissive")}), service)
    assert "lds.yaml" in changed(before, after) and before.bootstrap == after.bootstrap


# --- the controller's entry points ---

CASES = {
    "http strict": ("api", {"api": ServicePolicy(authz=API_RULES)}),
    "http permissive": ("api", {"api": ServicePolicy(authz=API_RULES, mtls="permissive",
                                                     rate_limit=RateLimit(5, 5))}),
    "tcp strict": ("db", {"db": ServicePolicy(authz=DB_RULES)}),
    "tcp permissive": ("db", {"db": ServicePolicy(authz=DB_RULES, mtls="permissive")}),
    "no rules": ("web", {}),
}


@pytest.mark.parametrize("override", [None, AuthzOverride(("other", "spiffe://authz.mesh/svc/web"), "abc")],
                         ids=["no-deny", "run-time-deny"])
@pytest.mark.parametrize(("service", "policies"), CASES.values(), ids=CASES.keys())
def test_an_inbound_file_rendered_alone_is_the_deploys_byte_for_byte(service: str, policies: dict[str, ServicePolicy],
                                                                     override: AuthzOverride | None) -> None:
    mesh = authz_mesh(policies)
    cfg = config_of(mesh, service, {service: override} if override else None)
    files = render_proxy_files(cfg)
    listed = inbound_files(cfg)
    expected = {f"{files.proxy_dir}/xds/rds.inbound.yaml": "route"} if cfg.inbound.http else {
        f"{files.proxy_dir}/xds/ecds.mesh.authz.deny.yaml": "tcp-deny",
        f"{files.proxy_dir}/xds/ecds.mesh.authz.allow.yaml": "tcp-allow"}
    assert listed == expected
    # what the controller does: the inputs from its spec (JSON), the policy and the deny give the same file
    inputs = InboundInputs.from_json(cfg.inbound.authz_inputs.to_json())
    for path, kind in listed.items():
        assert render_inbound_file(cfg.proxy, path, kind, inputs, mesh.policy(service), override) == files.file(path)


def test_an_unknown_inbound_kind_is_refused() -> None:
    cfg = config_of(authz_mesh(), "api")
    with pytest.raises(ValueError, match="not an inbound file kind"):
        render_inbound_file(cfg.proxy, "/x", "lds", cfg.inbound.authz_inputs, ServicePolicy(), None)  # type: ignore[arg-type]


# --- goldens ---

GOLDENS = {
    "authz-api-rules": ("api", {"api": ServicePolicy(authz=API_RULES)}, {"api": AuthzOverride(("other",), "r7")}),
    "authz-api-permissive": ("api", {"api": ServicePolicy(authz=API_RULES, mtls="permissive")}, {}),
    "authz-db-permissive": ("db", {"db": ServicePolicy(authz=DB_RULES, mtls="permissive")}, {}),
}


def golden_files(case: str) -> ProxyFiles:
    service, policies, overrides = GOLDENS[case]
    return files_of(authz_mesh(policies), service, overrides)


@pytest.mark.parametrize("case", GOLDENS)
def test_authz_goldens(case: str, update_goldens: bool) -> None:
    files = golden_files(case)
    check_golden_folder(files, GOLDEN / case, update_goldens)



def test_the_inbound_listener_reads_the_route_named_as_itself() -> None:
    cfg = config_of(authz_mesh(), "api")
    assert cfg.inbound.route is not None
    renamed = replace(cfg, inbound=replace(cfg.inbound, route=replace(cfg.inbound.route, name="elsewhere")))
    with pytest.raises(InconsistentConfig, match="reads route 'inbound', not 'elsewhere'"):
        render_proxy_files(renamed)


@pytest.mark.parametrize(("path", "normalized"), [
    ("/orders/../admin/x", "/admin/x"), ("//admin//users", "/admin/users"), ("/orders/%2e%2e/admin", "/admin"),
    ("/orders/./42?x=/admin/", "/orders/42"), ("/a/b/..", "/a/"), ("/a/../../b", "/b"), ("/%41b%2f", "/Ab%2F"),
])
def test_decide_meets_the_path_envoy_normalizes(path: str, normalized: str) -> None:
    assert normalized_path(path) == normalized


# --- delivery: the deploy's moves, waits and cleanup know the ECDS files ---

def test_the_deploy_moves_ecds_files_before_the_listeners_waits_for_them_and_keeps_them() -> None:
    files = golden_files("authz-db-permissive")
    names = [file.path.rsplit("/", 1)[-1] for file in files.files]
    assert names.index("ecds.mesh.authz.deny.yaml") < names.index("lds.yaml")
    on_host = {file.path: "old" for file in files.files}
    assert stale_paths(files, on_host) == ()  # rendered files are never stale
    install = host_validation(files, user=None).install
    assert "wait_for extension_config_discovery.network_filter.mesh.authz.deny.version_text" in install
    # a service that became HTTP leaves its ECDS files behind as stale: removed after the moves
    http = files_of(authz_mesh(), "api")
    stale = stale_paths(http, {f"{http.proxy_dir}/xds/ecds.mesh.authz.deny.yaml": "x"})
    assert stale == (f"{http.proxy_dir}/xds/ecds.mesh.authz.deny.yaml",)
