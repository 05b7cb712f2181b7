"""`mesh_services` (a traffic policy per service) and `mesh_zone`/`mesh_region` (where a host is), as a user meets
them: `mesh inventory check` on small YAML and INI inventories written to tmp folders, every bad value named
with file, line and key and exit 4; the typed policy a valid inventory gives; zone and region in the Consul
registrations."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from catalog_samples import make_mesh
from meshvars_helpers import Fleet, find

from mesh import catalog
from mesh.catalog import ObservedInstance
from mesh.cli import run
from mesh.errors import EXIT_PARSE_ERROR, InventoryErrors
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.inventory.policy import (
    Abort,
    Backoff,
    CircuitBreaker,
    Delay,
    Fault,
    HashOn,
    LoadBalancing,
    Mirror,
    OutlierPolicy,
    PathMatch,
    RateLimit,
    Retries,
    RouteMatch,
    RouteRule,
    ServicePolicy,
)
from mesh.inventory.validate import build_mesh

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
            - {service: api, version: v1, port: 9090}
            - {service: api, version: v2, port: 9091}
            - {service: db, port: 5432, protocol: tcp}
"""
CONSUL = "mesh_consul_url: http://10.0.0.2:8500\n"


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def check(folder: Path, capsys: pytest.CaptureFixture[str], inventory: str = "inventory.yml") -> tuple[int, str]:
    """`mesh inventory check` of folder/inventory: the exit code and what it printed (stdout and stderr)."""
    code = run(["inventory", "check", str(folder / inventory)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out + captured.err


def policy_error(folder: Path, capsys: pytest.CaptureFixture[str], service: str, field: str) -> str:
    """The check's output for an inventory whose group_vars/all.yml sets `service: {field}` at line 4."""
    write(folder, {"inventory.yml": INVENTORY,
                   "group_vars/all.yml": f"{CONSUL}mesh_services:\n  {service}:\n    {field}\n"})
    code, output = check(folder, capsys)
    assert code == EXIT_PARSE_ERROR, output
    return output


# Each: the service, its policy field (one line of YAML), the key the error names and a fragment of the message.
BAD_VALUES = [
    # lb
    ("api", "lb: {policy: round_robbin}", "lb.policy", "did you mean 'round_robin'"),
    ("api", "lb: {policy: ring_hash}", "lb", "ring_hash needs hash_on"),
    ("api", "lb: {policy: least_request, hash_on: source_ip}", "lb.hash_on", "for ring_hash and maglev"),
    ("api", "lb: {policy: maglev, hash_on: {header: 'x user'}}", "lb.hash_on.header", "an HTTP header name"),
    ("api", "lb: {policy: maglev, hash_on: {query: q}}", "lb.hash_on.query", "{header: NAME}, {cookie: NAME}"),
    ("api", "lb: least_request", "lb", "expected a mapping such as {policy: least_request}"),
    ("db", "lb: {policy: ring_hash, hash_on: {header: x-user}}", "lb.hash_on", "a connection has no headers"),
    ("db", "lb: {policy: ring_hash, hash_on: {cookie: session}}", "lb.hash_on", "hash on source_ip"),
    ("db", "lb: {policy: maglev, hash_on: source_ip}", "lb.policy", "TCP services take round_robin"),
    # timeout
    ("api", "timeout: -1s", "timeout", "expected a duration such as 500ms"),
    ("api", "timeout: 0ms", "timeout", "longer than zero"),
    ("api", "timeout: 2", "timeout", "write the unit"),
    ("api", "timeout: 25h", "timeout", "at most 24h"),
    ("api", "timeout: 1.0001ms", "timeout", "whole number of milliseconds"),
    ("db", "timeout: 2s", "timeout", "db is a TCP service (protocol tcp): a TCP connection has no requests"),
    # retries
    ("api", "retries: {attempts: -1}", "retries.attempts", "an integer from 0 to 100"),
    ("api", "retries: {attempts: true}", "retries.attempts", "got True (bool)"),
    ("api", "retries: {attempts: 99999999999999999999999}", "retries.attempts", "out of range"),
    ("api", "retries: {per_try_timeout: 1s}", "retries", "retries need `attempts`"),
    ("api", "retries: {attempts: 2, per_try_timeout: 0s}", "retries.per_try_timeout", "longer than zero"),
    ("api", "retries: {attempts: 2, on: [5xxx]}", "retries.on[0]", "did you mean '5xx'"),
    ("api", "retries: {attempts: 2, on: [5xx, 5xx]}", "retries.on[1]", "written twice"),
    ("api", "retries: {attempts: 2, backoff: {base: 100ms, max: 10ms}}", "retries.backoff.max", "at least base"),
    ("api", "retries: {attempts: 2, tries: 3}", "retries.tries", "unknown retries key"),
    ("db", "retries: {attempts: 2}", "retries", "TCP connections carry no requests to retry"),
    # circuit_breaker
    ("api", "circuit_breaker: {max_connections: 0}", "circuit_breaker.max_connections", "from 1 to"),
    ("api", "circuit_breaker: {max_requests: 4294967296}", "circuit_breaker.max_requests", "out of range"),
    ("api", "circuit_breaker: {retry_budget: 101}", "circuit_breaker.retry_budget", "a percentage from 0 to 100"),
    ("api", "circuit_breaker: {max_conections: 10}", "circuit_breaker.max_conections", "did you mean 'max_connections'"),
    # outlier_detection
    ("api", "outlier_detection: {consecutive_5xx: 0}", "outlier_detection.consecutive_5xx", "from 1 to"),
    ("api", "outlier_detection: {interval: 10}", "outlier_detection.interval", "write the unit"),
    ("api", "outlier_detection: {max_ejection_percent: 12.5}", "outlier_detection.max_ejection_percent",
     "a whole percentage"),
    ("api", "outlier_detection: {base_ejection_time: -30s}", "outlier_detection.base_ejection_time", "a duration"),
    # routes
    ("api", "routes: [{to: {v1: 90, v2: 20}}]", "routes[0].to", "sum to 100, got 110 (90 + 20)"),
    ("api", "routes: [{to: {v1: 50}}]", "routes[0].to", "sum to 100, got 50"),
    ("api", "routes: [{to: {v1: 101, v2: -1}}]", "routes[0].to.v1", "an integer from 0 to 100"),
    ("api", "routes: [{to: {v1: 90.5, v2: 9.5}}]", "routes[0].to.v1", "an integer from 0 to 100"),
    ("api", "routes: [{to: {v3: 100}}]", "routes[0].to.v3", "no instance of api runs version 'v3'; its versions: v1, v2"),
    ("api", "routes: [{to: {}}]", "routes[0].to", "expected versions and their weights"),
    ("api", "routes: [{match: {headers: {x-canary: '1'}}}]", "routes[0]", "a route needs `to`"),
    ("api", "routes: {to: {v1: 100}}", "routes", "expected a list of routes"),
    ("api", "routes: [{match: {path: {regex: '(a'}}, to: {v1: 100}}]", "routes[0].match.path.regex",
     "missing ), unterminated subpattern"),
    ("api", "routes: [{match: {path: {regex: '(a)\\1'}}, to: {v1: 100}}]", "routes[0].match.path.regex",
     "RE2 has no backreferences"),
    ("api", "routes: [{match: {path: {regex: '/a(?=b)'}}, to: {v1: 100}}]", "routes[0].match.path.regex",
     "RE2 has no lookaround"),
    ("api", "routes: [{match: {path: {regex: '/a(?<!b)'}}, to: {v1: 100}}]", "routes[0].match.path.regex",
     "RE2 has no lookaround"),
    ("api", "routes: [{match: {path: {prefix: api}}, to: {v1: 100}}]", "routes[0].match.path.prefix",
     "starting with '/'"),
    ("api", "routes: [{match: {path: {prefx: /api}}, to: {v1: 100}}]", "routes[0].match.path.prefx",
     "did you mean 'prefix'"),
    ("api", "routes: [{match: {method: FETCH}, to: {v1: 100}}]", "routes[0].match.method", "an HTTP method"),
    ("api", "routes: [{match: {headers: {'x canary': '1'}}, to: {v1: 100}}]", "routes[0].match.headers.x canary",
     "an HTTP header name"),
    ("api", "routes: [{match: {headers: {x-canary: yes}}, to: {v1: 100}}]", "routes[0].match.headers.x-canary",
     "quote it"),
    ("api", "routes: [{match: {headers: {X-A: '1', x-a: '2'}}, to: {v1: 100}}]", "routes[0].match.headers.x-a",
     "written twice"),
    ("api", "routes: [{match: {cookies: {user: 'a b'}}, to: {v1: 100}}]", "routes[0].match.cookies.user",
     "a cookie value"),
    ("api", "routes: [{match: {header: {x: '1'}}, to: {v1: 100}}]", "routes[0].match.header", "did you mean 'headers'"),
    ("api", "routes: [{to: {v1: 100}, timeout: 0s}]", "routes[0].timeout", "longer than zero"),
    ("api", "routes: [{to: {v1: 100}, retries: {attempts: 1, on: nope}}]", "routes[0].retries.on", "a retry condition"),
    ("db", "routes: [{to: {v1: 100}}]", "routes", "routes match HTTP requests"),
    # mirror
    ("api", "mirror: {to: v9, percent: 5}", "mirror.to", "no instance of api runs version 'v9'"),
    ("api", "mirror: {to: v2, percent: 105}", "mirror.percent", "out of range"),
    ("api", "mirror: {to: v2, percent: '5.123456%'}", "mirror.percent", "at most 4 decimals"),
    ("api", "mirror: {percent: 5}", "mirror", "a mirror needs `to`"),
    ("db", "mirror: {to: v1, percent: 5}", "mirror", "mirroring copies HTTP requests"),
    # fault
    ("api", "fault: {abort: {status: 600, percent: 50}}", "fault.abort.status", "from 200 to 599"),
    ("api", "fault: {abort: {status: 503, percent: -5}}", "fault.abort.percent", "a percentage from 0 to 100"),
    ("api", "fault: {abort: {percent: 5}}", "fault.abort", "an abort needs `status`"),
    ("api", "fault: {delay: {duration: -2s}}", "fault.delay.duration", "a duration"),
    ("api", "fault: {delay: {duration: 2s, percent: null}}", "fault.delay.percent", "got None"),
    ("api", "fault: {when_headers: {x-test: '1'}}", "fault", "a fault needs abort, delay or both"),
    ("api", "fault: {abort: {status: 503}, when_header: {x: '1'}}", "fault.when_header", "did you mean 'when_headers'"),
    ("db", "fault: {abort: {status: 503}}", "fault", "faults are injected into HTTP requests"),
    # rate_limit
    ("api", "rate_limit: {requests_per_second: 0}", "rate_limit.requests_per_second", "from 1 to"),
    ("api", "rate_limit: {requests_per_second: 100, burst: 10}", "rate_limit.burst", "at least requests_per_second"),
    ("api", "rate_limit: {burst: 10}", "rate_limit", "needs `requests_per_second`"),
    ("db", "rate_limit: {requests_per_second: 100}", "rate_limit", "Envoy's HTTP local rate limit"),
    # the policy itself
    ("api", "timout: 2s", "timout", "unknown service policy key; known keys: lb, timeout"),
    ("api", "mtls: strikt", "mtls", "did you mean 'strict'"),
    ("api", "authz: {allow: [{from: [webb]}]}", "authz.allow[0].from[0]", "no host runs the service 'webb'"),
]


@pytest.mark.parametrize(("service", "field", "key", "fragment"), BAD_VALUES,
                         ids=[f"{service}-{key}-{index}" for index, (service, _, key, _) in enumerate(BAD_VALUES)])
def test_a_bad_policy_value_names_file_line_and_key_and_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                service: str, field: str, key: str,
                                                                fragment: str) -> None:
    output = policy_error(tmp_path, capsys, service, field)
    prefix = f"{tmp_path}/group_vars/all.yml:4:"
    lines = [line for line in output.splitlines() if line.removeprefix("ERROR: ").startswith(prefix)
             and f": mesh_services.{service}.{key}: " in line]
    assert lines, output
    assert any(fragment in line for line in lines), output


def test_an_unknown_service_says_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = policy_error(tmp_path, capsys, "apii", "timeout: 1s")
    assert (f"{tmp_path}/group_vars/all.yml:3:3: mesh_services.apii: no host runs the service 'apii'; known "
            "services: api, db, web (did you mean 'api'?)") in output


@pytest.mark.parametrize("value", ["[api]", "'api'", "{API: {}}", "{api: [timeout]}", "{api: 5}", "{1: {}}",
                                   "{null: {}}"])
def test_mesh_services_that_is_no_mapping_of_policies_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 value: str) -> None:
    write(tmp_path, {"inventory.yml": INVENTORY, "group_vars/all.yml": f"{CONSUL}mesh_services: {value}\n"})
    code, output = check(tmp_path, capsys)
    assert code == EXIT_PARSE_ERROR
    assert f"{tmp_path}/group_vars/all.yml:2:" in output and "mesh_services" in output


HOSTILE = ["null", "true", "1e999", "-0", "[[[]]]", "{a: {b: {c: null}}}", "'{{ 1 }}'", "99999999999999999999999999",
           "'\\x00'", ".nan", "[]", "{}", "''"]
FIELDS = ["lb", "lb: {policy: ring_hash, hash_on: X}", "timeout", "retries", "retries: {attempts: 1, on: X}",
          "retries: {attempts: 1, backoff: X}", "circuit_breaker", "circuit_breaker: {retry_budget: X}",
          "outlier_detection", "outlier_detection: {max_ejection_percent: X}", "routes", "routes: [X]",
          "routes: [{to: X}]", "routes: [{to: {v1: X}}]", "routes: [{match: X, to: {v1: 100}}]",
          "routes: [{match: {path: X}, to: {v1: 100}}]", "routes: [{match: {headers: X}, to: {v1: 100}}]",
          "routes: [{match: {headers: {x: X}}, to: {v1: 100}}]", "routes: [{match: {method: X}, to: {v1: 100}}]",
          "mirror", "mirror: {to: X}", "fault", "fault: {abort: X}", "fault: {delay: {duration: X}}",
          "fault: {abort: {status: 503}, when_headers: X}", "rate_limit", "rate_limit: {requests_per_second: X}"]


@pytest.mark.parametrize("field", FIELDS)
def test_hostile_values_are_errors_never_tracebacks(field: str) -> None:
    """Every field given every odd value: the inventory either builds or lists errors (InventoryErrors); a
    traceback fails the test."""
    for value in HOSTILE:
        text = f"{field.replace('X', value)}" if "X" in field else f"{field}: {value}"
        fleet = Fleet(f"{CONSUL}mesh_services:\n  api:\n    {text}\n").controller()
        fleet.host("vm2", "ansible_host: 10.0.0.12\nmesh_workloads: [{service: api, port: 9090}]\n")
        try:
            fleet.build()
        except InventoryErrors:
            pass


# --- what a valid policy gives ----------------------------------------------------------------------------------

FULL_POLICY = """\
mesh_services:
  api:
    lb: {policy: ring_hash, hash_on: {header: X-User}}
    timeout: 2s
    retries: {attempts: 3, per_try_timeout: 500ms, on: [5xx, reset, connect-failure, unavailable], backoff: {base: 25ms, max: 250ms}}
    circuit_breaker: {max_connections: 1000, max_pending_requests: 100, max_requests: 1000, max_retries: 3, retry_budget: 20}
    outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 50}
    routes:
      - match: {headers: {x-canary: "1"}, cookies: {user: bob}, path: {prefix: /api}, method: get}
        to: {v2: 100}
        timeout: 1s
        retries: {attempts: 1}
      - match: {path: {regex: '/orders/[0-9]+'}}
        to: {v1: 50, v2: 50}
      - to: {v1: 90, v2: 10}
    mirror: {to: v2, percent: 5%}
    fault: {abort: {status: 503, percent: 0.5}, delay: {duration: 1.5s, percent: 10}, when_headers: {x-test: 1}}
    rate_limit: {requests_per_second: 100, burst: 200}
  db:
    lb: {policy: ring_hash, hash_on: source_ip}
    circuit_breaker: {max_connections: 10}
    outlier_detection: {consecutive_5xx: 3}
  web: {}
"""

EXPECTED_API = ServicePolicy(
    lb=LoadBalancing("ring_hash", HashOn("header", "x-user")),
    timeout_ms=2000,
    retries=Retries(3, 500, ("5xx", "reset", "connect-failure", "unavailable"), Backoff(25, 250)),
    circuit_breaker=CircuitBreaker(1000, 100, 1000, 3, 20.0),
    outlier_detection=OutlierPolicy(5, 2, 10_000, 30_000, 50),
    routes=(
        RouteRule((("v2", 100),), RouteMatch((("x-canary", "1"),), (("user", "bob"),), PathMatch("prefix", "/api"),
                                             "GET"), 1000, Retries(1)),
        RouteRule((("v1", 50), ("v2", 50)), RouteMatch(path=PathMatch("regex", "/orders/[0-9]+"))),
        RouteRule((("v1", 90), ("v2", 10))),
    ),
    mirror=Mirror("v2", 5.0),
    fault=Fault(Abort(503, 0.5), Delay(1500, 10.0), (("x-test", "1"),)),
    rate_limit=RateLimit(100, 200),
)


def test_every_field_of_a_valid_policy_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.yml": INVENTORY, "group_vars/all.yml": CONSUL + FULL_POLICY})
    code, output = check(tmp_path, capsys)
    assert code == 0, output
    mesh = Fleet(CONSUL + FULL_POLICY).controller().host("vm2", "ansible_host: 10.0.0.12\nmesh_workloads: [{service: "
                                                                "api, port: 9090}, {service: api, version: v2, port: "
                                                                "9091}, {service: db, port: 5432, protocol: tcp}, "
                                                                "{service: web, port: 8080}]\n").build()
    assert mesh.policy("api") == EXPECTED_API
    assert mesh.policy("db") == ServicePolicy(lb=LoadBalancing("ring_hash", HashOn("source_ip")),
                                              circuit_breaker=CircuitBreaker(max_connections=10),
                                              outlier_detection=OutlierPolicy(consecutive_5xx=3))
    assert mesh.policy("web") == ServicePolicy() and mesh.policy("nobody") == ServicePolicy()
    assert list(mesh.policies) == ["api", "db", "web"]


def test_the_check_summary_lists_each_policy_briefly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.yml": INVENTORY, "group_vars/all.yml": CONSUL + FULL_POLICY})
    code, output = check(tmp_path, capsys)
    assert code == 0, output
    assert ("    policy: lb ring_hash on header x-user, timeout 2s, retries 3, circuit_breaker, outlier_detection, "
            "3 route(s), mirror 5% to v2, fault, rate_limit 100/s per instance") in output
    assert "    policy: lb ring_hash on source_ip, circuit_breaker, outlier_detection" in output


def test_a_policy_for_a_service_with_workload_errors_is_still_checked() -> None:
    """api's only workload has a bad port: mesh_services.api is no unknown service, but its own errors show."""
    fleet = Fleet(f"{CONSUL}mesh_services:\n  api: {{timeout: 0s}}\n").controller()
    errors = fleet.host("vm2", "ansible_host: 10.0.0.12\nmesh_workloads: [{service: api, port: 0}]\n").errors()
    find(errors, "group_vars/all.yml", 3, "mesh_services.api.timeout", "longer than zero")
    assert not [error for error in errors if error.key == "mesh_services.api"]


def test_mesh_services_must_agree_on_every_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.yml": INVENTORY, "group_vars/all.yml": f"{CONSUL}mesh_services: {{api: {{timeout: 1s}}}}\n",
                     "host_vars/vm2.yml": "mesh_services: {api: {timeout: 2s}}\n"})
    code, output = check(tmp_path, capsys)
    assert code == EXIT_PARSE_ERROR
    assert "mesh_services: a mesh-wide variable must be the same on every host" in output


# --- INI ---------------------------------------------------------------------------------------------------------

INI = """\
[mesh_controllers]
ctl1 ansible_host=10.77.0.3

[vms]
vm1 ansible_host=10.77.0.11 mesh_zone=eu-west-1a mesh_region=eu-west-1
vm2 ansible_host=10.77.0.12 mesh_zone={zone}

[vms:vars]
mesh_region=eu-west-1
"""
INI_WORKLOADS = {
    "host_vars/vm1.yml": "mesh_workloads:\n  - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}\n",
    "host_vars/vm2.yml": "mesh_workloads:\n  - {service: api, port: 9090}\n  - {service: api, version: v2, port: 9091}\n",
}


def test_ini_with_group_vars_reads_policies_and_zones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.ini": INI.format(zone="eu-west-1b"), **INI_WORKLOADS,
                     "group_vars/all.yml": f"{CONSUL}mesh_services:\n  api:\n    routes: [{{to: {{v1: '90', v2: '10'}}}}]\n"
                                           "    rate_limit: {requests_per_second: '50'}\n"})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == 0, output
    mesh = build_mesh(load_inventory(str(tmp_path / "inventory.ini")), str(tmp_path / "inventory.ini"))
    assert [(host.name, host.zone, host.region) for host in mesh.hosts] == [
        ("ctl1", None, None), ("vm1", "eu-west-1a", "eu-west-1"), ("vm2", "eu-west-1b", "eu-west-1")]
    assert mesh.policy("api").routes == (RouteRule((("v1", 90), ("v2", 10))),)
    assert mesh.policy("api").rate_limit == RateLimit(50, 50)


def test_ini_bad_policy_in_group_vars_names_its_file_line_and_key(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.ini": INI.format(zone="eu-west-1b"), **INI_WORKLOADS,
                     "group_vars/all.yml": f"{CONSUL}mesh_services:\n  api:\n    routes:\n      - to: {{v1: 90, v3: 10}}\n"})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == EXIT_PARSE_ERROR
    assert (f"{tmp_path}/group_vars/all.yml:5:22: mesh_services.api.routes[0].to.v3: no instance of api runs "
            "version 'v3'; its versions: v1, v2") in output


def test_ini_mesh_services_in_vars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Python literal in [all:vars] is read as Ansible reads it (a mapping); anything else is a string, refused
    with where to write it instead."""
    literal = "mesh_services={'api': {'timeout': '0s'}}"
    write(tmp_path, {"inventory.ini": INI.format(zone="eu-west-1b") + f"\n[all:vars]\n{literal}\n",
                     **INI_WORKLOADS, "group_vars/all.yml": CONSUL})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == EXIT_PARSE_ERROR
    assert f"{tmp_path}/inventory.ini:12:1: mesh_services.api.timeout: expected a duration longer than zero" in output
    write(tmp_path, {"inventory.ini": INI.format(zone="eu-west-1b") + "\n[all:vars]\nmesh_services=api:1s\n"})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == EXIT_PARSE_ERROR
    assert f"{tmp_path}/inventory.ini:12:1: mesh_services: expected a mapping from service name" in output
    assert "set mesh_services in group_vars/all.yml" in output


@pytest.mark.parametrize("zone", ["'eu west'", "-eu", "a" * 64, "eu/1", "'e\\u00fc'"])
def test_a_bad_zone_names_the_ini_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], zone: str) -> None:
    write(tmp_path, {"inventory.ini": INI.format(zone=zone), **INI_WORKLOADS, "group_vars/all.yml": CONSUL})
    code, output = check(tmp_path, capsys, "inventory.ini")
    assert code == EXIT_PARSE_ERROR, output
    assert f"{tmp_path}/inventory.ini:6" in output and "mesh_zone: expected a name such as eu-west-1a" in output


@pytest.mark.parametrize("value", ["7", "true", "[a]", "''", "'a.b_c-D'"])
def test_zone_and_region_in_yaml(value: str) -> None:
    fleet = Fleet().controller().host("vm2", f"ansible_host: 10.0.0.12\nmesh_region: {value}\n"
                                             "mesh_workloads: [{service: api, port: 9090}]\n")
    if value == "'a.b_c-D'":
        assert fleet.build().host("vm2").region == "a.b_c-D"
        return
    find(fleet.errors(), "host_vars/vm2.yml", 2, "mesh_region", "expected a name such as eu-west-1a")


def test_a_misspelled_zone_variable_says_did_you_mean() -> None:
    fleet = Fleet().controller().host("vm2", "ansible_host: 10.0.0.12\nmesh_zones: a\n")
    error = find(fleet.errors(), "host_vars/vm2.yml", 2, "mesh_zones", "unknown mesh variable")
    assert "did you mean 'mesh_zone'" in str(error)


# --- Consul registrations ----------------------------------------------------------------------------------------

def zoned_mesh() -> Mesh:
    mesh = make_mesh()
    hosts = tuple(replace(host, zone="z1", region="r1") if host.name == "vm2" else
                  replace(host, region="r2") if host.name == "dock1" else host for host in mesh.hosts)
    return replace(mesh, hosts=hosts)


def test_zone_and_region_are_in_each_instances_meta_when_set() -> None:
    regs = {reg.service_id: dict(reg.meta) for reg in catalog.registrations(zoned_mesh())}
    assert regs["api-vm2-9090"]["zone"] == "z1" and regs["api-vm2-9090"]["region"] == "r1"
    assert regs["db-vm2-5432"]["zone"] == "z1"
    assert "zone" not in regs["api-dock1-api-v2-1"] and regs["api-dock1-api-v2-1"]["region"] == "r2"
    assert "zone" not in regs["web-vm1-8080"] and "region" not in regs["web-vm1-8080"]


def test_a_changed_zone_reregisters_the_instance_and_an_unchanged_one_does_not() -> None:
    before = catalog.registrations(make_mesh())
    after = catalog.registrations(zoned_mesh())
    seen = tuple(ObservedInstance(reg.node, reg.address, catalog.node_meta(reg.meta[catalog.MESH_ID]),
                                  reg.service_body(), {**catalog.check_body(reg.ref, "passing", "ok")})
                 for reg in before)
    state = catalog.CatalogState(seen, ("vm1", "vm2", "dock1"), {name: "lab.mesh" for name in ("vm1", "vm2", "dock1")})
    plan = catalog.plan_sync(after, state, "lab.mesh")
    assert sorted(service_id for service_id, _ in plan.register) == ["api-dock1-api-v2-1", "api-vm2-9090",
                                                                    "db-vm2-5432"]
    assert plan.unchanged == ("web-vm1-8080",)
    body = dict(plan.register)["api-vm2-9090"]
    assert body["Service"]["Meta"]["zone"] == "z1" and "Check" not in body  # the checker's status is kept


def test_the_installed_mesh_command_exits_4_with_the_message(tmp_path: Path) -> None:
    """The same through the real `mesh` executable: exit status 4, the message on stderr, no traceback."""
    write(tmp_path, {"inventory.yml": INVENTORY,
                     "group_vars/all.yml": f"{CONSUL}mesh_services:\n  db:\n    lb: {{policy: ring_hash, hash_on: "
                                           "{header: x-user}}\n"})
    mesh = shutil.which("mesh")
    assert mesh, "mesh is not on PATH (tests/conftest.py puts the environment's bin first)"
    done = subprocess.run([mesh, "inventory", "check", str(tmp_path / "inventory.yml")], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == EXIT_PARSE_ERROR
    assert (f"{tmp_path}/group_vars/all.yml:4:38: mesh_services.db.lb.hash_on: db is a TCP service: a connection "
            "has no headers or cookies; hash on source_ip (affinity per calling instance)") in done.stderr
    assert "Traceback" not in done.stderr
