"""Who may call whom, as the inventory writes it: `mesh_authz_default`, and `mtls` and `authz` in `mesh_services`,
read from YAML and INI inventories by `mesh inventory check`; every bad value named with file, line and key (exit
4, never a traceback); a declared call that a rule denies entirely is an error at the upstream entry; the
policy's canonical JSON and the run-time deny's KV value round-trip."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshvars_helpers import Fleet, find

from mesh.cli import run
from mesh.errors import EXIT_PARSE_ERROR, InventoryErrors
from mesh.inventory.authz import parse_rule_path, rule_text
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.inventory.policy import AuthzOverride, AuthzRule, AuthzRules, PathMatch, ServicePolicy
from mesh.inventory.services import (
    PolicyError,
    ServiceFacts,
    authz_override_from_json,
    authz_override_to_json,
    check_authz_override,
    policy_from_json,
    policy_to_json,
)
from mesh.inventory.validate import build_mesh

# web calls api and db; api (HTTP, v1 and v2) calls db (TCP). Nobody calls web.
INVENTORY = """\
all:
  children:
    mesh_controllers: {hosts: {ctl1: {ansible_host: 10.0.0.3}}}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}, {service: db, local_port: 19102}]}
        vm2:
          ansible_host: 10.0.0.12
          mesh_workloads:
            - {service: api, version: v1, port: 9090, upstreams: [{service: db, local_port: 19103}]}
            - {service: api, version: v2, port: 9091}
            - {service: db, port: 5432, protocol: tcp}
"""
CONSUL = "mesh_consul_url: http://10.0.0.2:8500\nmesh_trust_domain: lab.mesh\n"
TD = "lab.mesh"


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def check(folder: Path, capsys: pytest.CaptureFixture[str], inventory: str = "inventory.yml") -> tuple[int, str]:
    """`mesh inventory check`: its exit code and everything it printed; never a traceback."""
    code = run(["inventory", "check", str(folder / inventory)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.out + captured.err


def mesh_of(folder: Path, inventory: str = "inventory.yml") -> Mesh:
    path = str(folder / inventory)
    return build_mesh(load_inventory(path), path)


# --- what valid fields give -------------------------------------------------------------------------------------

POLICIES = """\
mesh_authz_default: declared
mesh_services:
  api:
    mtls: permissive
    authz:
      allow:
        - {from: [web], methods: [get, POST], paths: [/orders, /orders/*], headers: {X-Team: blue}}
        - {from: [unauthenticated, spiffe://lab.mesh/svc/db], mode: shadow}
      deny:
        - {from: [web], paths: [/admin/*]}
        - {mode: shadow, headers: {x-debug: "1"}}
  db:
    mtls: strict
    authz:
      deny: [{from: [spiffe://lab.mesh/svc/web], mode: enforce}]
      allow: [{from: [api, web]}]
"""

EXPECTED_API = ServicePolicy(mtls="permissive", authz=AuthzRules(
    allow=(AuthzRule(("web",), ("GET", "POST"), (PathMatch("exact", "/orders"), PathMatch("prefix", "/orders/")),
                     (("x-team", "blue"),)),
           AuthzRule(("unauthenticated", "spiffe://lab.mesh/svc/db"), mode="shadow")),
    deny=(AuthzRule(("web",), paths=(PathMatch("prefix", "/admin/"),)),
          AuthzRule(headers=(("x-debug", "1"),), mode="shadow")),
))
EXPECTED_DB = ServicePolicy(authz=AuthzRules(allow=(AuthzRule(("api", "web")),),
                                             deny=(AuthzRule(("spiffe://lab.mesh/svc/web",)),)))


def test_every_authz_field_is_read_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # web's own deny on db is partial? No: db denies web entirely, so web may not declare db here.
    inventory = INVENTORY.replace(", {service: db, local_port: 19102}", "")
    write(tmp_path, {"inventory.yml": inventory, "group_vars/all.yml": CONSUL + POLICIES})
    code, output = check(tmp_path, capsys)
    assert code == 0, output
    mesh = mesh_of(tmp_path)
    assert mesh.settings.authz_default == "declared"
    assert mesh.policy("api") == EXPECTED_API
    assert mesh.policy("db") == EXPECTED_DB
    assert mesh.policy("web") == ServicePolicy() and mesh.policy("web").mtls == "strict"


def test_the_default_is_declared_and_each_value_is_read(tmp_path: Path) -> None:
    write(tmp_path, {"inventory.yml": INVENTORY, "group_vars/all.yml": CONSUL})
    assert mesh_of(tmp_path).settings.authz_default == "declared"
    for value in ("declared", "allow"):
        write(tmp_path, {"group_vars/all.yml": f"{CONSUL}mesh_authz_default: {value}\n"})
        assert mesh_of(tmp_path).settings.authz_default == value


def test_the_check_summary_names_mtls_and_the_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = INVENTORY.replace(", {service: db, local_port: 19102}", "")
    write(tmp_path, {"inventory.yml": inventory, "group_vars/all.yml": CONSUL + POLICIES})
    code, output = check(tmp_path, capsys)
    assert code == 0, output
    assert "    policy: mtls permissive, authz (default declared; 2 allow, 2 deny, 2 in shadow mode)" in output
    assert "    policy: authz (default declared; 1 allow, 1 deny)" in output


# --- INI ----------------------------------------------------------------------------------------------------------

INI = """\
[mesh_controllers]
ctl1 ansible_host=10.0.0.3

[vms]
vm1 ansible_host=10.0.0.11
vm2 ansible_host=10.0.0.12

[all:vars]
mesh_consul_url=http://10.0.0.2:8500
mesh_trust_domain=lab.mesh
{extra}
"""
INI_WORKLOADS = {
    "host_vars/vm1.yml": "mesh_workloads:\n  - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}\n",
    "host_vars/vm2.yml": "mesh_workloads:\n  - {service: api, port: 9090}\n  - {service: db, port: 5432, protocol: tcp}\n",
}


def test_ini_reads_the_default_as_text_and_policies_as_python_literals(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    literal = ("mesh_services={'api': {'mtls': 'permissive', 'authz': {'allow': [{'from': ['web'], 'methods': "
               "['GET'], 'paths': ['/orders/*']}], 'deny': [{'from': ['unauthenticated']}]}}}")
    write(tmp_path, {"inventory.ini": INI.format(extra=f"mesh_authz_default=deny\n{literal}"), **INI_WORKLOADS})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == 0, output
    mesh = mesh_of(tmp_path, "inventory.ini")
    assert mesh.settings.authz_default == "deny"
    assert mesh.policy("api") == ServicePolicy(mtls="permissive", authz=AuthzRules(
        allow=(AuthzRule(("web",), ("GET",), (PathMatch("prefix", "/orders/"),)),),
        deny=(AuthzRule(("unauthenticated",)),)))


def test_ini_policies_in_group_vars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.ini": INI.format(extra=""), **INI_WORKLOADS,
                     "group_vars/all.yml": "mesh_services:\n  db:\n    authz: {deny: [{from: [web]}]}\n"})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == 0, output
    assert mesh_of(tmp_path, "inventory.ini").policy("db").authz.deny == (AuthzRule(("web",)),)


@pytest.mark.parametrize(("text", "fragment"), [
    ("mesh_authz_default=denied", "got 'denied' (did you mean 'deny'?)"),
    ("mesh_authz_default=True", "got True (bool)"),
    ("mesh_authz_default=['deny']", "got ['deny'] (list)"),
    ("mesh_authz_default=allow;rm -rf /", "got 'allow;rm -rf /'"),
])
def test_ini_bad_default_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        fragment: str) -> None:
    write(tmp_path, {"inventory.ini": INI.format(extra=text), **INI_WORKLOADS})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == EXIT_PARSE_ERROR, output
    assert f"{tmp_path}/inventory.ini:11:1: mesh_authz_default: expected declared" in output
    assert fragment in output


def test_ini_bad_rule_in_a_literal_names_the_ini_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    literal = "mesh_services={'api': {'authz': {'allow': [{'from': ['webb']}]}}}"
    write(tmp_path, {"inventory.ini": INI.format(extra=literal), **INI_WORKLOADS})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == EXIT_PARSE_ERROR
    assert (f"{tmp_path}/inventory.ini:11:1: mesh_services.api.authz.allow[0].from[0]: no host runs the service "
            "'webb'; known services: api, db, web (did you mean 'web'?)") in output


# --- bad values: file, line, key ----------------------------------------------------------------------------------

BAD_VALUES = [
    # mtls
    ("api", "mtls: strikt", "mtls", "did you mean 'strict'"),
    ("api", "mtls: yes", "mtls", "got True (bool) (YAML reads yes, no"),
    ("api", "mtls: [strict]", "mtls", "expected strict (only mTLS clients) or permissive"),
    # authz itself
    ("api", "authz: [allow]", "authz", "expected a mapping such as {allow: [{from: [web]}]"),
    ("api", "authz: {allows: []}", "authz.allows", "did you mean 'allow'"),
    ("api", "authz: {allow: {from: [web]}}", "authz.allow", "expected a list of rules"),
    ("api", "authz: {deny: [web]}", "authz.deny[0]", "expected a mapping such as {from: [web]"),
    ("api", "authz: {deny: [{form: [web]}]}", "authz.deny[0].form", "did you mean 'from'"),
    # from
    ("api", "authz: {allow: [{from: web}]}", "authz.allow[0].from", "expected a non-empty list such as [web"),
    ("api", "authz: {allow: [{from: []}]}", "authz.allow[0].from", "leave `from` out for any source"),
    ("api", "authz: {allow: [{from: [webb]}]}", "authz.allow[0].from[0]", "no host runs the service 'webb'"),
    ("api", "authz: {allow: [{from: [Web]}]}", "authz.allow[0].from[0]", "expected a service name, a SPIFFE id"),
    ("api", "authz: {allow: [{from: [web, web]}]}", "authz.allow[0].from[1]", "'web' is written twice"),
    ("api", "authz: {allow: [{from: [web, 'spiffe://lab.mesh/svc/web']}]}", "authz.allow[0].from[1]",
     "written twice (as 'web')"),
    ("api", "authz: {allow: [{from: ['spiffe://other.mesh/svc/web']}]}", "authz.allow[0].from[0]",
     "outside the mesh's trust domain 'lab.mesh'"),
    ("api", "authz: {allow: [{from: ['spiffe://lab.mesh/mesh/health']}]}", "authz.allow[0].from[0]",
     "mesh's health checker"),
    ("api", "authz: {deny: [{from: ['spiffe://lab.mesh/mesh/health']}]}", "authz.deny[0].from[0]",
     "cannot be named in a rule"),
    ("api", "authz: {allow: [{from: ['spiffe://lab.mesh/svc/webb']}]}", "authz.allow[0].from[0]",
     "no host runs the service 'webb'"),
    ("api", "authz: {allow: [{from: ['spiffe://lab.mesh/ns/x/sa/web']}]}", "authz.allow[0].from[0]",
     "mesh issues no other ids"),
    ("api", "authz: {allow: [{from: ['spiffe://Lab!/svc/web']}]}", "authz.allow[0].from[0]",
     "the trust domain may hold only"),
    ("api", "authz: {allow: [{from: ['spiffe://lab.mesh/svc/web/../api']}]}", "authz.allow[0].from[0]",
     "no empty, '.' or '..' segment"),
    ("api", "authz: {allow: [{from: [true]}]}", "authz.allow[0].from[0]", "got True (bool)"),
    # methods
    ("api", "authz: {allow: [{from: [web], methods: [FETCH]}]}", "authz.allow[0].methods[0]", "an HTTP method"),
    ("api", "authz: {allow: [{from: [web], methods: [GET, get]}]}", "authz.allow[0].methods[1]", "written twice"),
    ("api", "authz: {allow: [{from: [web], methods: GET}]}", "authz.allow[0].methods", "a non-empty list"),
    # paths
    ("api", "authz: {allow: [{paths: ['*']}]}", "authz.allow[0].paths[0]", "leave `paths` out to match every path"),
    ("api", "authz: {allow: [{paths: [orders]}]}", "authz.allow[0].paths[0]", "starting with '/'"),
    ("api", "authz: {allow: [{paths: ['/orders*']}]}", "authz.allow[0].paths[0]", "'*' may only be the last segment"),
    ("api", "authz: {allow: [{paths: ['/a/*/b']}]}", "authz.allow[0].paths[0]", "'*' may only be the last segment"),
    ("api", "authz: {allow: [{paths: ['/orders?id=1']}]}", "authz.allow[0].paths[0]", "the query is never matched"),
    ("api", "authz: {allow: [{paths: ['/a b']}]}", "authz.allow[0].paths[0]", "no space"),
    ("api", "authz: {allow: [{paths: [/a, /a]}]}", "authz.allow[0].paths[1]", "'/a' is written twice"),
    # headers
    ("api", "authz: {allow: [{headers: {'x team': a}}]}", "authz.allow[0].headers.x team", "an HTTP header name"),
    ("api", "authz: {allow: [{headers: {x-team: yes}}]}", "authz.allow[0].headers.x-team", "quote it"),
    ("api", "authz: {allow: [{headers: [x-team]}]}", "authz.allow[0].headers", "expected headers and their exact"),
    # mode
    ("api", "authz: {deny: [{from: [web], mode: dry-run}]}", "authz.deny[0].mode", "expected enforce or shadow"),
    ("api", "authz: {deny: [{from: [web], mode: shadw}]}", "authz.deny[0].mode", "did you mean 'shadow'"),
    # HTTP fields on a TCP service
    ("db", "authz: {allow: [{from: [api], methods: [GET]}]}", "authz.allow[0].methods",
     "db is a TCP service (protocol tcp): a connection has no methods, paths or headers"),
    ("db", "authz: {deny: [{from: [web], paths: [/x]}]}", "authz.deny[0].paths", "db is a TCP service"),
    ("db", "authz: {allow: [{headers: {x-a: b}}]}", "authz.allow[0].headers", "db is a TCP service"),
]


@pytest.mark.parametrize(("service", "field", "key", "fragment"), BAD_VALUES,
                         ids=[f"{service}-{key}-{index}" for index, (service, _, key, _) in enumerate(BAD_VALUES)])
def test_a_bad_authz_value_names_file_line_and_key_and_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               service: str, field: str, key: str,
                                                               fragment: str) -> None:
    write(tmp_path, {"inventory.yml": INVENTORY,
                     "group_vars/all.yml": f"{CONSUL}mesh_services:\n  {service}:\n    {field}\n"})
    code, output = check(tmp_path, capsys)
    assert code == EXIT_PARSE_ERROR, output
    prefix = f"{tmp_path}/group_vars/all.yml:5:"
    lines = [line for line in output.splitlines() if line.removeprefix("ERROR: ").startswith(prefix)
             and f": mesh_services.{service}.{key}: " in line]
    assert any(fragment in line for line in lines), output


@pytest.mark.parametrize(("value", "fragment"), [
    ("denny", "got 'denny' (did you mean 'deny'?)"),
    ("no", "got False (bool)"),
    ("Declared", "did you mean 'declared'"),
    ("[deny]", "got ['deny'] (list)"),
    ('"x\\ny"', "got 'x\\ny'"),
])
def test_a_bad_default_names_file_line_and_key(value: str, fragment: str) -> None:
    errors = Fleet(f"mesh_consul_url: http://10.0.0.2:8500\nmesh_authz_default: {value}\n").controller().errors()
    error = find(errors, "group_vars/all.yml", 2, "mesh_authz_default",
                 "expected declared (only workloads that list the service in their upstreams), allow")
    assert fragment in str(error)


def test_a_misspelled_default_variable_says_did_you_mean() -> None:
    errors = Fleet("mesh_consul_url: http://10.0.0.2:8500\nmesh_authz_defaults: deny\n").controller().errors()
    error = find(errors, "group_vars/all.yml", 2, "mesh_authz_defaults", "unknown mesh variable")
    assert "did you mean 'mesh_authz_default'" in str(error)


HOSTILE = ["null", "true", "no", "1e999", "-0", "[[[]]]", "{a: {b: {c: null}}}", "'{{ 1 }}'", "99999999999999999999",
           "'\\x00'", "'$(reboot)'", "'`id`; rm -rf /'", "'a\\nb'", "'\\u2028'", ".nan", "[]", "{}", "''",
           "'" + "a" * 100_000 + "'", "[" + ", ".join(["web"] * 300) + "]"]
FIELDS = ["mtls", "authz", "authz: {allow: X}", "authz: {deny: [X]}", "authz: {allow: [{from: X}]}",
          "authz: {allow: [{from: [X]}]}", "authz: {deny: [{methods: X}]}", "authz: {deny: [{methods: [X]}]}",
          "authz: {allow: [{paths: X}]}", "authz: {allow: [{paths: [X]}]}", "authz: {allow: [{headers: X}]}",
          "authz: {allow: [{headers: {x-a: X}}]}", "authz: {allow: [{from: [web], mode: X}]}"]


@pytest.mark.parametrize("field", FIELDS)
def test_hostile_values_are_errors_never_tracebacks(field: str) -> None:
    """Every authz field given every odd value (shell metacharacters, newlines, huge strings, YAML booleans,
    non-strings): the inventory builds or lists errors, never a traceback."""
    for value in HOSTILE:
        text = field.replace("X", value) if "X" in field else f"{field}: {value}"
        fleet = Fleet(f"mesh_consul_url: http://10.0.0.2:8500\nmesh_services:\n  api:\n    {text}\n").controller()
        fleet.host("vm1", "ansible_host: 10.0.0.11\nmesh_workloads: [{service: web, port: 8080, upstreams: "
                          "[{service: api, local_port: 19101}]}]\n")
        fleet.host("vm2", "ansible_host: 10.0.0.12\nmesh_workloads: [{service: api, port: 9090}]\n")
        try:
            fleet.build()
        except InventoryErrors as exc:
            # a rule denying every source makes web's declared call an error too
            assert all(error.key and error.key.startswith(("mesh_services.api", "mesh_workloads[0].upstreams[0]"))
                       for error in exc.errors), exc


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_default_is_an_error(value: str) -> None:
    errors = Fleet(f"mesh_consul_url: http://10.0.0.2:8500\nmesh_authz_default: {value}\n").controller().errors()
    find(errors, "group_vars/all.yml", 2, "mesh_authz_default", "expected declared")
    assert max(len(str(error)) for error in errors) < 1000


def test_the_error_about_a_huge_value_stays_short() -> None:
    fleet = Fleet("mesh_consul_url: http://10.0.0.2:8500\nmesh_services:\n  api:\n    authz: {allow: [{from: ['"
                  + "w" * 100_000 + "']}]}\n").controller()
    fleet.host("vm2", "ansible_host: 10.0.0.12\nmesh_workloads: [{service: api, port: 9090}]\n")
    errors = fleet.errors()
    assert errors and max(len(str(error)) for error in errors) < 500


# --- a declared call denied entirely --------------------------------------------------------------------------

def denied_calls(tmp_path: Path, capsys: pytest.CaptureFixture[str], policies: str) -> tuple[int, list[str]]:
    """The check of INVENTORY with group_vars/all.yml = CONSUL + policies: exit code and the lines about
    upstream entries."""
    write(tmp_path, {"inventory.yml": INVENTORY, "group_vars/all.yml": CONSUL + policies})
    code, output = check(tmp_path, capsys)
    return code, [line for line in output.splitlines() if ".upstreams[" in line]


def test_a_deny_rule_naming_a_declared_caller_is_an_error_at_its_upstream(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = denied_calls(tmp_path, capsys, "mesh_services:\n  api:\n    authz:\n      deny:\n"
                                                 "        - {from: [db], mode: shadow}\n        - {from: [web]}\n")
    assert code == EXIT_PARSE_ERROR
    assert lines == [
        (f"ERROR: {tmp_path}/inventory.yml:9:54: mesh_workloads[0].upstreams[0]: web calls api, but api's "
        f"authorization denies web every request: authz.deny[1] {{from: [web]}} ({tmp_path}/group_vars/all.yml:"
        "8:11) (allow it some requests, or remove the upstream)")]


@pytest.mark.parametrize("rule", ["{}", "{from: [spiffe://lab.mesh/svc/api]}", "{from: [unauthenticated, api]}"])
def test_any_unconditional_deny_of_the_caller_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         rule: str) -> None:
    code, lines = denied_calls(tmp_path, capsys, f"mesh_services:\n  db:\n    authz: {{deny: [{rule}]}}\n")
    assert code == EXIT_PARSE_ERROR
    assert any(f"{tmp_path}/inventory.yml:13:67: " in line and "mesh_workloads[0].upstreams[0]: api calls db, but "
               "db's authorization denies api every request: authz.deny[0]" in line for line in lines), lines


def test_the_default_deny_needs_an_allow_rule_for_every_declared_call(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = denied_calls(tmp_path, capsys, "mesh_authz_default: deny\nmesh_services:\n  api:\n"
                                                 "    authz: {allow: [{from: [web], methods: [GET]}]}\n"
                                                 "  db:\n    authz: {allow: [{from: [api]}, {from: [web], "
                                                 "mode: shadow}]}\n")
    assert code == EXIT_PARSE_ERROR
    assert lines == [(f"ERROR: {tmp_path}/inventory.yml:9:89: mesh_workloads[0].upstreams[1]: web calls db, but "
                     "db's authorization denies web every request: mesh_authz_default is deny and no enforced allow "
                     "rule names web (allow it some requests, or remove the upstream)")]


@pytest.mark.parametrize("policies", [
    # partial denies, shadow denies, a deny of someone else
    "mesh_services:\n  api:\n    authz: {deny: [{from: [web], paths: [/admin/*]}, {from: [web], mode: shadow}]}\n",
    "mesh_services:\n  api:\n    authz: {deny: [{from: [web], methods: [DELETE]}, {from: [unauthenticated]}]}\n",
    "mesh_services:\n  api:\n    authz: {deny: [{headers: {x-debug: '1'}}]}\n",
    # an allow rule narrowing a declared caller still allows something
    "mesh_services:\n  api:\n    authz: {allow: [{from: [web], methods: [GET]}]}\n",
    # the default deny with allow rules for every declared call, one of them for any source
    ("mesh_authz_default: deny\nmesh_services:\n  api:\n    authz: {allow: [{from: ['spiffe://lab.mesh/svc/web'], "
    "paths: [/x]}]}\n  db:\n    authz: {allow: [{}]}\n"),
    "mesh_authz_default: allow\n",
])
def test_partial_and_shadow_denies_are_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str], policies: str) -> None:
    code, lines = denied_calls(tmp_path, capsys, policies)
    assert code == 0 and not lines, lines


def test_a_policy_with_errors_is_not_judged_for_declared_calls() -> None:
    fleet = Fleet("mesh_consul_url: http://10.0.0.2:8500\nmesh_authz_default: deny\nmesh_services:\n  api:\n"
                  "    authz: {allow: [{from: [web], methods: [FETCH]}]}\n").controller()
    fleet.host("vm1", "ansible_host: 10.0.0.11\nmesh_workloads: [{service: web, port: 8080, upstreams: "
                      "[{service: api, local_port: 19101}]}]\n")
    errors = fleet.host("vm2", "ansible_host: 10.0.0.12\nmesh_workloads: [{service: api, port: 9090}]\n").errors()
    assert [error.key for error in errors] == ["mesh_services.api.authz.allow[0].methods[0]"]


# --- canonical JSON ---------------------------------------------------------------------------------------------

sources = st.sampled_from(["web", "api", "db", "unauthenticated", "spiffe://lab.mesh/svc/batch"])
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])
rule_paths = st.builds(PathMatch, st.sampled_from(["exact", "prefix"]),
                       st.from_regex(r"/([a-z0-9._-]{1,8}/){0,3}", fullmatch=True)).map(
    lambda p: PathMatch(p.kind, p.value.rstrip("/") or "/") if p.kind == "exact" else
    PathMatch(p.kind, p.value if p.value.endswith("/") else p.value + "/"))
header_pairs = st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
                               st.from_regex(r"[A-Za-z0-9][ -~]{0,8}[A-Za-z0-9]|[A-Za-z0-9]", fullmatch=True),
                               max_size=3).map(lambda d: tuple(d.items()))
http_rules = st.builds(AuthzRule, st.lists(sources, unique=True, max_size=3).map(tuple),
                       st.lists(methods, unique=True, max_size=3).map(tuple),
                       st.lists(rule_paths, unique=True, max_size=3).map(tuple), header_pairs,
                       st.sampled_from(["enforce", "shadow"]))
authz_policies = st.builds(ServicePolicy, mtls=st.sampled_from(["strict", "permissive"]),
                           authz=st.builds(AuthzRules, st.lists(http_rules, max_size=3).map(tuple),
                                           st.lists(http_rules, max_size=3).map(tuple)))


@settings(max_examples=300, deadline=None)
@given(authz_policies)
def test_every_authz_policy_round_trips_through_json_text(policy: ServicePolicy) -> None:
    data = policy_to_json(policy)
    assert policy_from_json(json.loads(json.dumps(data))) == policy
    assert policy_to_json(policy_from_json(data)) == data


def test_the_json_is_the_inventory_syntax() -> None:
    assert policy_to_json(EXPECTED_API) == {"mtls": "permissive", "authz": {
        "allow": [{"from": ["web"], "methods": ["GET", "POST"], "paths": ["/orders", "/orders/*"],
                   "headers": {"x-team": "blue"}},
                  {"from": ["unauthenticated", "spiffe://lab.mesh/svc/db"], "mode": "shadow"}],
        "deny": [{"from": ["web"], "paths": ["/admin/*"]}, {"headers": {"x-debug": "1"}, "mode": "shadow"}]}}
    assert policy_to_json(ServicePolicy(authz=AuthzRules(deny=(AuthzRule(),)))) == {"authz": {"deny": [{}]}}
    assert policy_to_json(ServicePolicy(mtls="strict")) == {}


@pytest.mark.parametrize(("data", "fragment"), [
    ({"mtls": "open"}, "policy.mtls: expected strict"),
    ({"authz": {"allow": [{"from": ["spiffe://lab.mesh/mesh/health"]}]}}, ("policy.authz.allow[0].from[0]: "
                                                                         "'spiffe://lab.mesh/mesh/health' is mesh's")),
    ({"authz": {"deny": [{"paths": ["/x?y"]}]}}, "policy.authz.deny[0].paths[0]: expected a path without a query"),
    ({"authz": {"deny": "all"}}, "policy.authz.deny: expected a list of rules"),
])
def test_bad_authz_json_is_a_policy_error(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_from_json(data)
    assert fragment in str(caught.value)


def test_json_checked_with_facts_refuses_http_fields_on_tcp() -> None:
    data = {"authz": {"allow": [{"from": ["api"], "methods": ["GET"]}]}}
    assert policy_from_json(data).authz.allow[0].methods == ("GET",)
    with pytest.raises(PolicyError, match="db is a TCP service"):
        policy_from_json(data, ServiceFacts("db", ("v1",), "tcp"))


# --- the run-time deny (Consul KV) ------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(sources, unique=True, max_size=4), st.text(max_size=12), st.text(max_size=12), st.text(max_size=12))
def test_a_run_time_deny_round_trips_sorted(deny_from: list[str], revision: str, set_by: str, at: str) -> None:
    override = AuthzOverride(tuple(sorted(deny_from)), revision)
    data = json.loads(json.dumps(authz_override_to_json(override, set_by, at)))
    assert data == {"deny_from": sorted(deny_from), "revision": revision, "set_by": set_by, "at": at}
    assert authz_override_from_json(data) == override


def test_a_run_time_deny_is_read_sorted_and_unique() -> None:
    data = {"deny_from": ["web", "api", "web"], "revision": "ab12"}
    assert authz_override_from_json(data) == AuthzOverride(("api", "web"), "ab12")


@pytest.mark.parametrize(("data", "fragment"), [
    ([], "expected a mapping"),
    ({"deny_from": "web"}, "deny_from: expected a list of at most 256 sources"),
    ({"deny_from": [1]}, "deny_from[0]: expected a service name"),
    ({"deny_from": ["web;reboot"]}, "deny_from[0]: expected a service name"),
    ({"deny_from": ["spiffe://td/mesh/health"]}, "mesh's health checker"),
    ({"deny_from": ["web"], "revision": 5}, "revision: expected a string"),
    ({"deny_from": ["web"], "by": "x"}, "unknown authz override key"),
])
def test_a_bad_run_time_deny_is_a_policy_error(data: object, fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        authz_override_from_json(data)
    assert fragment in str(caught.value)


def test_check_authz_override_names_what_cannot_apply() -> None:
    services = ("api", "db", "web")
    assert check_authz_override(AuthzOverride(("spiffe://lab.mesh/svc/web", "unauthenticated", "web")), services,
                                TD) == []
    problems = check_authz_override(AuthzOverride(("spiffe://other/svc/web", "webb")), services, TD)
    assert problems == [
        ("deny_from[0]: 'spiffe://other/svc/web' is outside the mesh's trust domain 'lab.mesh': no certificate of "
        "this mesh carries it"),
        "deny_from[1]: no host runs the service 'webb'; known services: api, db, web (did you mean 'web'?)"]


# --- the syntax helpers -------------------------------------------------------------------------------------------

def test_paths_and_rules_as_the_inventory_writes_them() -> None:
    assert parse_rule_path("/orders/*") == PathMatch("prefix", "/orders/")
    assert parse_rule_path("/*") == PathMatch("prefix", "/")
    assert parse_rule_path("/orders") == PathMatch("exact", "/orders")
    assert rule_text(AuthzRule(("web",), ("GET",), (PathMatch("prefix", "/admin/"),), (("x-a", "yes"),),
                               "shadow")) == '{from: [web], methods: [GET], paths: [/admin/*], headers: {x-a: "yes"}, ' \
                                             'mode: shadow}'
    assert rule_text(AuthzRule()) == "{}"
