"""`mesh inventory check`: reader warnings are refused, every rule is checked, a valid inventory gets a
short summary; end to end through the CLI on small inventories written to tmp folders."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from meshvars_helpers import Fleet

from mesh.cli import run
from mesh.errors import InventoryErrors, InventoryWarning, Origin
from mesh.inventory.check import check_inventory

EXAMPLE = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://10.77.0.2:8500
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.77.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.77.0.11
          mesh_workloads:
            - {service: web, port: 8080, health: {http: /healthz}, upstreams: [{service: api, local_port: 19101}]}
        vm2:
          ansible_host: 10.77.0.12
          mesh_workloads:
            - {service: api, version: v1, port: 9090, upstreams: [{service: db, local_port: 19102}]}
            - {service: db, port: 5432, protocol: tcp}
    containers:
      vars: {mesh_host_kind: container_host}
      hosts:
        dock1:
          ansible_host: 10.77.0.20
          mesh_workloads:
            - {service: api, version: v2, port: 9090, container: api-v2-1, upstreams: [{service: db, local_port: 19102}]}
    others:
      hosts:
        consul1: {ansible_host: 10.77.0.2}
"""


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_summary_of_a_valid_inventory() -> None:
    fleet = Fleet().controller().host("vm1", "mesh_workloads: [{service: web, port: 80}, {service: web, port: 81,"
                                             " version: v2}]\n").host("consul1")
    lines = check_inventory(fleet.data).summary_lines()
    assert lines[0] == "inventory /srv/fleet/inventory.yml: ok"
    assert "2 vm, 0 container_host, 1 controller(s) among them, 1 other" in lines[1]
    assert "  web: 2 instance(s), version(s) v1, v2" in lines
    assert lines[-2:] == ["instances: 2", "tracing: off (mesh trace rebuilds a request's hops from the access logs)"]


def test_summary_says_where_spans_go() -> None:
    fleet = Fleet("mesh_consul_url: http://10.77.0.2:8500\nmesh_tracing: {sampling: 100}\n").controller()
    assert check_inventory(fleet.data).summary_lines()[-1] == \
        "tracing: 100 % of requests, spans to mesh's collector on the controllers"
    fleet = Fleet("mesh_tracing: {otlp: 'http://otel.example:4318', sampling: 0.5}\n").controller()
    assert check_inventory(fleet.data).summary_lines()[-1] == \
        "tracing: 0.5 % of requests, spans to the OTLP collector http://otel.example:4318"


def test_reader_warnings_are_refused() -> None:
    fleet = Fleet().controller()
    fleet.data.warn(InventoryWarning(Origin("/srv/fleet/inventory.yml", 7), "read as 18", key="ansible_port"))
    with pytest.raises(InventoryErrors) as caught:
        check_inventory(fleet.data)
    assert [str(error) for error in caught.value.errors] == ["/srv/fleet/inventory.yml:7: ansible_port: read as 18"]


def test_reader_warnings_and_rule_errors_come_together() -> None:
    fleet = Fleet().controller().host("vm1", "mesh_workloads: [{service: Web, port: 80}]\n")
    fleet.data.warn(InventoryWarning(Origin("/srv/fleet/inventory.yml", 3), "duplicate key", key="vm1"))
    with pytest.raises(InventoryErrors) as caught:
        check_inventory(fleet.data, "/srv/fleet/inventory.yml")
    assert [error.key for error in caught.value.errors] == ["vm1", "mesh_workloads[0].service"]


def test_cli_check_valid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.yml": EXAMPLE})
    assert run(["inventory", "check", str(tmp_path / "inventory.yml")]) == 0
    out = capsys.readouterr().out
    assert "hosts: 3 vm, 1 container_host, 1 controller(s) among them, 1 other (left alone)" in out
    assert "  api: 2 instance(s), version(s) v1, v2" in out and "instances: 4" in out


def test_cli_check_with_group_vars_and_host_vars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {
        "inventory.yml": """\
            all:
              children:
                mesh_controllers: {hosts: {ctl1: {ansible_host: 10.0.0.3}}}
                vms: {hosts: {vm1: {ansible_host: 10.0.0.11}}}
            """,
        "group_vars/all.yml": "mesh_consul_url: http://10.0.0.2:8500\nbase_port: 8000\n",
        "host_vars/vm1.yml": """\
            mesh_workloads:
              - service: web
                port: "{{ base_port + 80 }}"
                helth: {http: /healthz}
              - service: api
                port: 8080
            """,
    })
    assert run(["inventory", "check", str(tmp_path / "inventory.yml")]) == 4
    err = capsys.readouterr().err
    assert f"{tmp_path}/host_vars/vm1.yml:4:5: mesh_workloads[0].helth: unknown workload key" in err
    assert "did you mean 'health'" in err
    assert f"{tmp_path}/host_vars/vm1.yml:6:11: mesh_workloads[1].port: port 8080 is already used by " \
           "mesh_workloads[0].port" in err
    assert "Traceback" not in err


def test_cli_check_refuses_connection_and_mesh_variables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {
        "inventory.yml": """\
            all:
              vars:
                mesh_consul_url: http://10.0.0.2:8500
                mesh_cert_tll: 24h
              hosts:
                vm1:
                  ansible_host: 10.0.0.11
                  ansible_become_method: su
                  mesh_workloads: [{service: web, port: 22}]
            """,
    })
    assert run(["inventory", "check", str(tmp_path / "inventory.yml")]) == 4
    err = capsys.readouterr().err
    inventory = tmp_path / "inventory.yml"
    assert f"{inventory}:4:5: mesh_cert_tll: unknown mesh variable" in err and "'mesh_cert_ttl'" in err
    assert f"{inventory}:8:7: ansible_become_method: mesh becomes root with sudo" in err
    assert "mesh_workloads[0].port: port 22 is the SSH port of vm1" in err
    assert "mesh_controllers: the inventory has workloads but no host in the group mesh_controllers" in err


def test_cli_check_refuses_what_list_only_warns_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"inventory.yml": "all:\n  hosts:\n    vm1:\n      ansible_port: 022\n"})
    assert run(["inventory", "list", str(tmp_path / "inventory.yml")]) == 0
    capsys.readouterr()
    assert run(["inventory", "check", str(tmp_path / "inventory.yml")]) == 4
    err = capsys.readouterr().err
    assert f"{tmp_path / 'inventory.yml'}:4" in err and "ansible_port" in err


def test_cli_check_refuses_lookups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {
        "inventory.yml": EXAMPLE.replace("mesh_consul_url: http://10.77.0.2:8500",
                                         "mesh_consul_url: \"{{ lookup('env', 'CONSUL') }}\""),
    })
    assert run(["inventory", "check", str(tmp_path / "inventory.yml")]) == 4
    err = capsys.readouterr().err
    assert f"{tmp_path / 'inventory.yml'}:4:5: mesh_consul_url: `lookup(...)` is an Ansible lookup" in err


def test_cli_check_ini_with_host_vars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {
        "inventory.ini": """\
            [mesh_controllers]
            ctl1 ansible_host=10.77.0.3

            [vms]
            vm1 ansible_host=10.77.0.11 ansible_port=2222

            [containers]
            dock1 ansible_host=10.77.0.20

            [containers:vars]
            mesh_host_kind=container_host
            """,
        "group_vars/all.yml": "mesh_consul_url: http://10.77.0.2:8500\n",
        "host_vars/vm1.yml": "mesh_workloads:\n  - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}\n",
        "host_vars/dock1.yml": "mesh_workloads:\n  - {service: api, port: 9090, container: api-1}\n",
    })
    code = run(["inventory", "check", str(tmp_path / "inventory.ini")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "hosts: 2 vm, 1 container_host, 1 controller(s) among them, 0 other" in captured.out
