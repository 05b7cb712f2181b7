"""`mesh authz check/matrix/show/deny` as a user runs them, over a fake Consul KV (traffic_fakes.FakeTraffic
reading authz values): the answer and the deciding rule in the inventory's words, shadow rules, run-time denies
read from Consul (and a Consul that does not answer), the matrix over a sample mesh, what `deny` stores and the
wait for the controllers' state.authz, check-and-set against a concurrent writer, and every bad argument refused
with exit 5 (4 for a bad inventory), never a traceback. The deploy's reading of the denies too."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from traffic_fakes import FakeTraffic

from mesh.authz import commands
from mesh.authz.kv import decode_deny, plan_authz_overrides
from mesh.cli import run
from mesh.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARSE_ERROR, EXIT_USAGE, MeshError
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.policy import AuthzOverride

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://127.0.0.1:1
    mesh_state_dir: state
    mesh_services:
      api:
        mtls: permissive
        authz:
          deny:
            - {from: [web], paths: [/admin/*]}
            - {from: [web], methods: [DELETE], mode: shadow}
          allow:
            - {from: [web], methods: [GET], paths: [/orders, /orders/*]}
      db:
        authz:
          deny: [{from: [web]}]
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.0.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}
        vm2:
          ansible_host: 10.0.0.12
          mesh_workloads:
            - {service: api, version: v1, port: 9090, upstreams: [{service: db, local_port: 19102}]}
            - {service: api, version: v2, port: 9091, upstreams: [{service: db, local_port: 19103}]}
            - {service: db, port: 5432, protocol: tcp}
"""
REVISION = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    return path


def applies_everything(store: FakeTraffic) -> Mapping[str, str]:
    """A controller that applies every stored deny before anyone reads its report."""
    return {service: store.revision_of(service) for service in ("api", "db", "web", *store.values)}


def fake(controller: Any = applies_everything, lock_held: bool = True) -> FakeTraffic:
    return FakeTraffic(controller, lock_held, decode=decode_deny)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTraffic]:
    kv = fake()
    monkeypatch.setattr(commands, "STORE", lambda mesh: kv)
    yield kv


def mesh_run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


class Down(FakeTraffic):
    """A Consul that does not answer."""

    def read_all(self) -> Mapping[str, Any]:
        raise MeshError("Consul is unreachable at http://127.0.0.1:1")


def deny_value(*sources: str, revision: str = "r1") -> dict[str, Any]:
    return {"deny_from": list(sources), "revision": revision, "set_by": "ops@laptop", "at": "2026-12-06T20:00:00Z"}


# ---- check ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "lines"), [
    (["web", "api", "GET", "/orders/7"], ["web -> api GET /orders/7: allowed",
                                          ("  rule: api: allow[0] {from: [web], methods: [GET], paths: [/orders, "
                                          "/orders/*]}")]),
    (["web", "api", "GET", "/admin/users"], ["web -> api GET /admin/users: denied",
                                             "  rule: api: deny[0] {from: [web], paths: [/admin/*]}"]),
    (["web", "api", "DELETE", "/orders"], ["web -> api DELETE /orders: denied",
                                           ("  rule: api: none (no allow rule matches; allow[0] names this source, so "
                                            "the default does not cover it)"),
                                           ("  shadow: api: deny[1] {from: [web], methods: [DELETE], mode: shadow} "
                                           "would deny it")]),
    (["api", "db"], ["api -> db a TCP connection: allowed",
                     "  rule: db: default (declared: api lists db in its upstreams)"]),
    (["web", "db"], ["web -> db a TCP connection: denied", "  rule: db: deny[0] {from: [web]}"]),
    (["unauthenticated", "api", "/"], ["unauthenticated -> api GET /: allowed",
                                       "  rule: api: default (declared; permissive: plaintext clients are allowed)"]),
    (["unauthenticated", "db"], ["unauthenticated -> db a TCP connection: denied",
                                 ("  rule: db: mtls-strict (db accepts only mTLS: a plaintext client fails the "
                                 "handshake)")]),
    (["api", "web"], ["api -> web GET /: denied", "  rule: web: none (no allow rule matches)"]),
    (["spiffe://lab.mesh/mesh/health", "api"], ["spiffe://lab.mesh/mesh/health -> api GET /: denied",
                                                "  rule: api: none (no allow rule matches)"]),
])
def test_check_prints_the_answer_and_the_deciding_rule_and_exits_0(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str], args: list[str],
        lines: list[str]) -> None:
    code, out, err = mesh_run(["authz", "check", *args, "-i", str(inventory)], capsys)
    assert (code, err) == (EXIT_OK, "")
    assert out.splitlines() == lines


def test_check_json(inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = mesh_run(["authz", "check", "web", "api", "DELETE", "/orders?x=1", "--header", "X-Team=a",
                             "--json", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert json.loads(out) == {
        "source": "web", "source_id": "spiffe://lab.mesh/svc/web", "destination": "api",
        "request": {"method": "DELETE", "path": "/orders?x=1", "headers": {"x-team": "a"}},
        "allowed": False, "rule": "none",
        "rule_text": "none (no allow rule matches; allow[0] names this source, so the default does not cover it)",
        "would_deny": [{"rule": "deny[1]", "rule_text": "deny[1] {from: [web], methods: [DELETE], mode: shadow}"}]}


def test_check_counts_the_run_time_deny_and_names_who_set_it(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", deny_value("web"))
    code, out, _ = mesh_run(["authz", "check", "web", "api", "GET", "/orders", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert out.splitlines() == ["web -> api GET /orders: denied",
                                ("  rule: api: runtime-deny (mesh authz deny, set by ops@laptop at "
                                "2026-12-06T20:00:00Z)")]


def test_check_warns_of_an_ignored_run_time_deny_and_of_a_consul_that_does_not_answer(
        inventory: Path, store: FakeTraffic, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", deny_value("nosuch"))
    code, out, err = mesh_run(["authz", "check", "web", "api", "GET", "/orders", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and out.startswith("web -> api GET /orders: allowed")
    assert err.startswith("[WARNING]: the run-time deny of api is ignored: ") and "nosuch" in err

    monkeypatch.setattr(commands, "STORE", lambda mesh: Down(decode=decode_deny))
    code, out, err = mesh_run(["authz", "check", "web", "api", "GET", "/orders", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and out.startswith("web -> api GET /orders: allowed")
    assert err == ("[WARNING]: cannot read the run-time denies (mesh authz deny) (Consul is unreachable at "
                   "http://127.0.0.1:1): answers follow the inventory alone\n")


@pytest.mark.parametrize(("args", "message"), [
    (["web", "api", "get", "/"], "METHOD: HTTP methods are upper case: GET, not 'get'"),
    (["web", "api", "FETCH", "/"], "METHOD: expected an HTTP method"),
    (["web", "api", "GET", "orders"], "PATH: expected a URL path starting with '/'"),
    (["web", "apii"], "no service 'apii' in the inventory (did you mean 'api'?)"),
    (["wbe", "api"], "no source service 'wbe' in the inventory (did you mean 'web'?)"),
    (["spiffe://other.mesh/svc/web", "api"], "is not in the trust domain lab.mesh"),
    (["web", "db", "GET", "/"], "db is a TCP service: a connection has no method, path or headers"),
    (["web", "api", "GET", "/", "--header", "no-equals"], "--header: expected NAME=VALUE"),
    (["web"], "Missing argument 'DESTINATION'"),
])
def test_check_refuses_bad_arguments_with_exit_5_before_asking_consul(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    code, out, err = mesh_run(["authz", "check", *args, "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and out == ""
    assert message in err
    assert store.reads_of_report == 0


def test_a_bad_inventory_exits_4_and_no_inventory_exits_5(
        tmp_path: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    bad = tmp_path / "bad.yml"
    bad.write_text(INVENTORY.replace("mtls: permissive", "mtls: sometimes"))
    for command in (["check", "web", "api"], ["matrix"], ["show"], ["deny", "api", "--from", "web"]):
        code, _, err = mesh_run(["authz", *command, "-i", str(bad)], capsys)
        assert code == EXIT_PARSE_ERROR and "mtls" in err, command
        assert mesh_run(["authz", *command], capsys)[0] == EXIT_USAGE
    assert store.values == {}


# ---- matrix -----------------------------------------------------------------------------------------------


def test_matrix_over_the_sample_mesh(inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = mesh_run(["authz", "matrix", "--json", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert json.loads(out) == {
        "sources": ["api", "db", "web", "unauthenticated"], "destinations": ["api", "db", "web"],
        "matrix": {"api": {"api": "deny", "db": "allow", "web": "deny"},
                   "db": {"api": "deny", "db": "deny", "web": "deny"},
                   "web": {"api": "partial", "db": "deny", "web": "deny"},
                   "unauthenticated": {"api": "allow", "db": "deny", "web": "deny"}}}
    code, out, _ = mesh_run(["authz", "matrix", "-i", str(inventory)], capsys)
    rows = [re.sub(r"\s+", " ", line).strip() for line in out.splitlines()]
    assert "| web | partial | deny | deny |" in rows and "| unauthenticated | allow | deny | deny |" in rows
    assert any(row.startswith("allow: every request is allowed; deny: every request is denied; partial:")
               for row in rows)


def test_matrix_counts_run_time_denies(inventory: Path, store: FakeTraffic,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    store.put("db", deny_value("api"))
    code, out, _ = mesh_run(["authz", "matrix", "--json", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and json.loads(out)["matrix"]["api"]["db"] == "deny"


def test_matrix_of_a_strict_mesh_has_no_unauthenticated_row(
        tmp_path: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "strict.yml"
    path.write_text(INVENTORY.replace("mtls: permissive", "mtls: strict").replace(
        "    mesh_consul_url:", "    mesh_authz_default: allow\n    mesh_consul_url:"))
    code, out, _ = mesh_run(["authz", "matrix", "--json", "-i", str(path)], capsys)
    assert code == EXIT_OK
    assert json.loads(out)["matrix"] == {"api": {"api": "allow", "db": "allow", "web": "allow"},
                                         "db": {"api": "allow", "db": "allow", "web": "allow"},
                                         "web": {"api": "partial", "db": "deny", "web": "allow"}}


# ---- deny -------------------------------------------------------------------------------------------------


def test_deny_stores_the_sources_waits_for_state_authz_and_says_so(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = mesh_run(["authz", "deny", "api", "--from", "web", "-i", str(inventory)], capsys)
    assert code == EXIT_OK, err
    stored = store.document("api")
    assert stored["deny_from"] == ["web"] and REVISION.fullmatch(str(stored["revision"]))
    assert "@" in str(stored["set_by"]) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(stored["at"]))
    lines = out.splitlines()
    assert lines[0] == f"api: run-time deny from web stored (revision {stored['revision']})"
    assert lines[1] == "api: note: web lists api in its upstreams: its calls to api now fail"
    assert re.fullmatch(r"api: applied by every instance \(2\) in \d+\.\d s", lines[2])

    code, out, _ = mesh_run(["authz", "deny", "api", "--from", "spiffe://lab.mesh/svc/db", "--from", "web",
                             "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert store.document("api")["deny_from"] == ["spiffe://lab.mesh/svc/db", "web"]
    assert store.document("api")["revision"] != stored["revision"]


def test_deny_of_a_source_denied_already_changes_nothing(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", deny_value("web"))
    index = store.values["api"][1]
    code, out, _ = mesh_run(["authz", "deny", "api", "--from", "web", "-i", str(inventory)], capsys)
    assert (code, out) == (EXIT_OK, "api: web is denied already: nothing to change\n")
    assert store.values["api"][1] == index and store.log == []


def test_undo_removes_the_sources_given_or_the_whole_deny(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", deny_value("db", "web"))
    code, out, _ = mesh_run(["authz", "deny", "api", "--from", "web", "--undo", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and store.document("api")["deny_from"] == ["db"]
    assert out.startswith(f"api: run-time deny from db stored (revision {store.document('api')['revision']})\n")
    code, out, _ = mesh_run(["authz", "deny", "api", "--from", "web", "--undo", "-i", str(inventory)], capsys)
    assert (code, out) == (EXIT_OK, "api: web is not denied: nothing to change\n")
    code, out, _ = mesh_run(["authz", "deny", "api", "--undo", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and "api" not in store.values
    assert out.splitlines()[0] == "api: run-time deny removed (the inventory's rules hold)"
    assert re.fullmatch(r"api: applied by every instance \(2\) in \d+\.\d s", out.splitlines()[1])
    code, out, _ = mesh_run(["authz", "deny", "api", "--undo", "-i", str(inventory)], capsys)
    assert (code, out) == (EXIT_OK, "api: no override is stored: nothing to change\n")


def test_undo_removes_a_value_mesh_cannot_read(inventory: Path, store: FakeTraffic,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", "{not json")
    code, _, _ = mesh_run(["authz", "deny", "api", "--undo", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and "api" not in store.values


class RacingStore(FakeTraffic):
    """Someone else denies `db` between this command's read and its first write (check-and-set refuses it)."""

    def __init__(self) -> None:
        super().__init__(applies_everything, decode=decode_deny)
        self.raced = False

    def write(self, service: str, value: str, index: int) -> bool:
        if not self.raced:
            self.raced = True
            self.put(service, deny_value("db", revision="theirs"))
        return super().write(service, value, index)


def test_deny_keeps_a_deny_written_meanwhile_by_someone_else(
        inventory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    racing = RacingStore()
    monkeypatch.setattr(commands, "STORE", lambda mesh: racing)
    code, _, err = mesh_run(["authz", "deny", "api", "--from", "web", "-i", str(inventory)], capsys)
    assert code == EXIT_OK, err
    assert racing.document("api")["deny_from"] == ["db", "web"]


def test_deny_not_enforced_in_time_exits_1_and_stays_stored(
        inventory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    kv = fake(controller=lambda store: {"api": ""})  # an active controller that never applies it
    monkeypatch.setattr(commands, "STORE", lambda mesh: kv)
    code, _, err = mesh_run(["authz", "deny", "api", "--from", "web", "--wait", "0.3", "-i", str(inventory)], capsys)
    assert code == EXIT_ERROR
    revision = kv.document("api")["revision"]
    assert (f"ERROR: api: revision {revision} not applied within 0.3 s: the active controller reports no "
            f"override, not revision {revision}") in err
    assert "it stays stored in Consul" in err and kv.document("api")["deny_from"] == ["web"]


def test_deny_without_a_controller_stops_waiting_early_or_does_not_wait(
        inventory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    kv = fake(controller=None, lock_held=False)
    monkeypatch.setattr(commands, "STORE", lambda mesh: kv)
    monkeypatch.setattr("mesh.runtime_kv.NO_LOCK_GRACE_S", 0.2)
    code, _, err = mesh_run(["authz", "deny", "api", "--from", "web", "-i", str(inventory)], capsys)
    assert code == EXIT_ERROR and "no controller is active (nobody holds the controllers' lock)" in err
    polled = kv.reads_of_report
    code, out, _ = mesh_run(["authz", "deny", "db", "--from", "web", "--no-wait", "-i", str(inventory)], capsys)
    assert code == EXIT_OK and out.splitlines()[-1] == "db: not waiting for the controllers (--no-wait)"
    assert polled >= 1 and kv.reads_of_report == polled  # --no-wait does not ask the controllers


@pytest.mark.parametrize(("args", "message"), [
    (["api"], "give --from SRC"),
    (["apii", "--from", "web"], "no service 'apii' in the inventory (did you mean 'api'?)"),
    (["api", "--from", "wbe"], "no source service 'wbe' in the inventory (did you mean 'web'?)"),
    (["api", "--from", "unauthenticated"], "`unauthenticated` cannot be denied at run time"),
    (["api", "--from", "spiffe://lab.mesh/mesh/health"], "is mesh's health checker"),
    (["api", "--from", "spiffe://elsewhere/svc/web"], "is not in the trust domain lab.mesh"),
    (["api", "--from", "web", "--wait", "soon"], "--wait"),
])
def test_deny_refuses_bad_arguments_with_exit_5_before_writing(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    code, _, err = mesh_run(["authz", "deny", *args, "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and message in err
    assert store.values == {} and store.reads_of_report == 0


def test_ctrl_c_while_waiting_exits_99(inventory: Path, store: FakeTraffic, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "wait_applied", interrupted)
    code, _, err = mesh_run(["authz", "deny", "api", "--from", "web", "-i", str(inventory)], capsys)
    assert code == EXIT_INTERRUPTED and "interrupted" in err


# ---- show -------------------------------------------------------------------------------------------------


def test_show_lists_rules_default_mtls_and_the_run_time_deny(
        inventory: Path, store: FakeTraffic, capsys: pytest.CaptureFixture[str]) -> None:
    store.put("api", deny_value("web"))
    code, out, _ = mesh_run(["authz", "show", "api", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert out.splitlines() == [
        "api (http, mtls permissive)",
        ("  default: declared: web lists api in its upstreams; permissive: plaintext clients too (not for web: the "
        "allow rules naming them decide)"),
        "  deny[0] {from: [web], paths: [/admin/*]}",
        "  deny[1] {from: [web], methods: [DELETE], mode: shadow}",
        "  allow[0] {from: [web], methods: [GET], paths: [/orders, /orders/*]}",
        "  runtime-deny (mesh authz deny, set by ops@laptop at 2026-12-06T20:00:00Z): from web, revision r1",
        "  controller: applied: every instance enforces revision r1"]
    code, out, _ = mesh_run(["authz", "show", "--json", "-i", str(inventory)], capsys)
    services = {item["service"]: item for item in json.loads(out)["services"]}
    assert sorted(services) == ["api", "db", "web"]
    assert services["api"]["runtime_deny"] == {"deny_from": ["web"], "revision": "r1", "set_by": "ops@laptop",
                                               "at": "2026-12-06T20:00:00Z", "problems": [], "applies": True}
    assert services["api"]["controller"] == {"active": True, "reason": None, "revision": "r1", "applied": True}
    assert services["db"]["deny"] == [{"rule": "deny[0]", "text": "{from: [web]}", "mode": "enforce"}]
    assert (services["db"]["callers"], services["web"]["callers"], services["web"]["runtime_deny"]) == (
        ["api"], [], None)


def test_show_says_when_the_deny_is_not_applied_or_ignored(
        inventory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    kv = fake(controller=lambda store: {"api": "", "db": ""})
    monkeypatch.setattr(commands, "STORE", lambda mesh: kv)
    kv.put("api", deny_value("web"))
    kv.put("db", deny_value("nosuch"))
    kv.put("gone", deny_value("web"))
    code, out, _ = mesh_run(["authz", "show", "-i", str(inventory)], capsys)
    assert code == EXIT_OK
    assert ("  controller: not applied yet: instances enforce no run-time deny, not revision r1 (a push is pending "
            "or failed)") in out
    assert "    IGNORED (the inventory's rules hold): " in out and "nosuch" in out
    assert ("run-time deny of gone: ignored, the inventory has no service 'gone' (`mesh authz deny gone --undo` "
            "removes it)") in out
    kv.controller = None
    code, out, _ = mesh_run(["authz", "show", "-i", str(inventory)], capsys)
    assert "  controller:" not in out  # said once, under the services
    assert out.splitlines()[-1] == ("controller: none active (its state is older than 60s): instances follow the "
                                    "last deploy or push")
    code, _, err = mesh_run(["authz", "show", "apii", "-i", str(inventory)], capsys)
    assert code == EXIT_USAGE and "did you mean 'api'?" in err


# ---- the deploy's read ------------------------------------------------------------------------------------


def test_the_deploy_plans_with_every_usable_deny_and_warns_of_the_others(inventory: Path) -> None:
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    kv = fake()
    kv.put("api", deny_value("web"))
    kv.put("db", deny_value("nosuch"))
    kv.put("web", "{not json")
    warnings: list[str] = []
    assert plan_authz_overrides(mesh, warnings.append, kv) == {"api": AuthzOverride(("web",), "r1")}
    assert len(warnings) == 2 and all(warning.startswith("the run-time override of ") for warning in warnings)
    assert "(`mesh authz deny db --undo` removes it)" in warnings[0] and "not JSON" in warnings[1]

    warnings.clear()
    assert plan_authz_overrides(mesh, warnings.append, Down(decode=decode_deny)) == {}
    assert warnings == [("cannot read the run-time denies (mesh authz deny) (Consul is unreachable at "
                         "http://127.0.0.1:1): authorization "
                        "as the inventory says")]


def test_a_header_rule_under_the_deny_default(tmp_path: Path, store: FakeTraffic,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "headers.yml"
    path.write_text(INVENTORY.replace("    mesh_consul_url:", "    mesh_authz_default: deny\n    mesh_consul_url:").replace(
        "            - {from: [web], methods: [GET], paths: [/orders, /orders/*]}",
        "            - {from: [web], headers: {x-team: a}}\n"
        "            - {from: [web], methods: [GET], paths: [/orders, /orders/*]}").replace(
        "          deny: [{from: [web]}]", "          allow: [{from: [api]}]"))
    code, out, _ = mesh_run(["authz", "check", "web", "api", "PUT", "/x", "--header", "x-team=a", "-i", str(path)],
                            capsys)
    assert code == EXIT_OK
    assert out.splitlines() == ["web -> api PUT /x x-team=a: allowed", ("  rule: api: allow[0] {from: [web], headers: "
                                "{x-team: a}}")]
    code, out, _ = mesh_run(["authz", "check", "web", "api", "PUT", "/x", "-i", str(path)], capsys)
    assert out.splitlines()[0] == "web -> api PUT /x: denied"
    code, out, _ = mesh_run(["authz", "matrix", "--json", "-i", str(path)], capsys)
    assert json.loads(out)["matrix"] == {"api": {"api": "deny", "db": "allow", "web": "deny"},
                                         "db": {"api": "deny", "db": "deny", "web": "deny"},
                                         "web": {"api": "partial", "db": "deny", "web": "deny"},
                                         "unauthenticated": {"api": "allow", "db": "deny", "web": "deny"}}
    # permissive: plaintext clients are in the default even under `deny` (the issue: "the default during
    # permissive is allow")
