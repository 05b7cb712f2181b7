"""The mesh variables of INVENTORY.md: each rule has a test that fails when the rule is broken, and each
refusal names the file, the line and the key."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from meshvars_helpers import INVENTORY, Fleet, find

from mesh.errors import Origin
from mesh.inventory.data import InventoryData, Var
from mesh.inventory.resolve import host_vars_with_origins
from mesh.inventory.validate import build_mesh, resolve_state_dir
from mesh.inventory.values import BadValue, parse_duration, parse_port

VM1 = """\
ansible_host: 10.77.0.11
mesh_workloads:
  - service: web
    port: 8080
    health: {http: /healthz}
    upstreams: [{service: api, local_port: 19101}]
"""
VM2 = """\
ansible_host: 10.77.0.12
mesh_workloads:
  - {service: api, version: v1, port: 9090, upstreams: [{service: db, local_port: 19102}]}
  - {service: db, port: 5432, protocol: tcp}
"""
DOCK1 = """\
ansible_host: 10.77.0.20
mesh_workloads:
  - {service: api, version: v2, port: 9090, container: api-v2-1, upstreams: [{service: db, local_port: 19102}]}
"""


def example() -> Fleet:
    """The example of INVENTORY.md."""
    fleet = Fleet("mesh_trust_domain: lab.mesh\nmesh_consul_url: http://10.77.0.2:8500\n")
    fleet.controller().host("vm1", VM1, "vms").host("vm2", VM2, "vms")
    fleet.group_vars("containers", "mesh_host_kind: container_host\n")
    return fleet.host("dock1", DOCK1, "containers")


def one_vm(workloads: str, extra: str = "", all_vars: str | None = None) -> Fleet:
    """A controller and vm1 whose host_vars file is `extra` then `mesh_workloads:` then workloads."""
    fleet = Fleet() if all_vars is None else Fleet(all_vars)
    return fleet.controller().host("vm1", extra + "mesh_workloads:\n" + workloads)


# --- the model -----------------------------------------------------------------------------------------------

def test_example_builds_the_mesh_of_the_contract() -> None:
    mesh = example().build()
    assert mesh.settings.trust_domain == "lab.mesh"
    assert mesh.settings.consul_url == "http://10.77.0.2:8500"
    assert mesh.settings.cert_ttl == timedelta(hours=24)
    assert mesh.settings.state_dir == "/srv/fleet/.mesh"
    assert [(h.name, h.kind, h.is_controller) for h in mesh.hosts] == [
        ("ctl1", "vm", True), ("vm1", "vm", False), ("vm2", "vm", False), ("dock1", "container_host", False)]
    assert [h.name for h in mesh.controllers] == ["ctl1"]
    assert {name: len(items) for name, items in mesh.services.items()} == {"api": 2, "db": 1, "web": 1}
    db = mesh.services["db"][0]
    assert (db.index, db.proxy_port, db.admin_port, db.protocol) == (1, 21001, 19001, "tcp")
    assert db.consul_id == "db-vm2-5432"  # keyed by its app port, not its place in the list
    assert db.spiffe_id == "spiffe://lab.mesh/svc/db"
    web = mesh.host("vm1").workloads[0]
    assert web.health.kind == "http" and web.health.http_path == "/healthz"
    assert web.health.interval == timedelta(seconds=5)
    assert web.upstreams[0].service == "api" and web.upstreams[0].local_port == 19101
    assert mesh.host("dock1").workloads[0].container == "api-v2-1"
    assert mesh.host("vm1").connection.address == "10.77.0.11"
    assert mesh.host("vm1").connection.port == 22


def test_defaults_of_a_workload() -> None:
    mesh = one_vm("  - {service: web, port: '8080'}\n").build()
    web = mesh.workloads[0]
    assert (web.version, web.protocol, web.port, web.proxy_port, web.admin_port) == ("v1", "http", 8080, 21000, 19000)
    assert web.health.kind == "tcp" and web.upstreams == ()
    assert mesh.settings.trust_domain == "mesh.local"
    assert web.spiffe_id == "spiffe://mesh.local/svc/web"
    assert mesh.settings.known_hosts == "~/.ssh/known_hosts"


def test_hosts_without_workloads_or_controller_role_are_not_managed() -> None:
    mesh = one_vm("  - {service: web, port: 8080}\n").host("consul1", "ansible_password: secret\n").build()
    assert mesh.unmanaged_hosts == ("consul1",)
    assert "consul1" not in [h.name for h in mesh.hosts]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5s", timedelta(seconds=5)), ("90m", timedelta(minutes=90)), ("24h", timedelta(hours=24)),
     ("1d", timedelta(days=1)), ("1h30m", timedelta(minutes=90))],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5", "0s", "5 s", "1.5h", "-1h", "30m1h", "h", "", "5sec", 5, None, True])
def test_durations_are_strict(text: object) -> None:
    with pytest.raises(BadValue):
        parse_duration(text)


@pytest.mark.parametrize(("value", "expected"), [(8080, 8080), ("8080", 8080), (1, 1), ("65535", 65535)])
def test_ports(value: object, expected: int) -> None:
    assert parse_port(value) == expected


@pytest.mark.parametrize("value", [0, 65536, "0", "022", "08080", True, False, 8080.0, "80a", " 80", "", None, -1, "٣"])
def test_ports_are_strict(value: object) -> None:
    with pytest.raises(BadValue):
        parse_port(value)


# --- mesh-wide -----------------------------------------------------------------------------------------------

def test_state_dir_relative_starts_at_the_inventory_folder(tmp_path: object) -> None:
    assert resolve_state_dir(".mesh", "/srv/fleet/inventory.yml") == "/srv/fleet/.mesh"
    assert resolve_state_dir("state", "/srv/fleet/inventory.yml") == "/srv/fleet/state"
    assert resolve_state_dir("/var/lib/mesh", "/srv/fleet/inventory.yml") == "/var/lib/mesh"
    assert resolve_state_dir("state", str(tmp_path)) == os.path.join(str(tmp_path), "state")
    assert resolve_state_dir("state", "/srv/fleet/aws_ec2.yml", dynamic=True) == os.path.join(os.getcwd(), "state")


def test_state_dir_of_an_executable_inventory_starts_at_the_current_directory(tmp_path: object) -> None:
    script = os.path.join(str(tmp_path), "inventory.py")
    with open(script, "w") as handle:
        handle.write("#!/bin/sh\n")
    os.chmod(script, 0o755)
    assert resolve_state_dir(".mesh", script) == os.path.join(os.getcwd(), ".mesh")


def test_mesh_state_dir_and_cert_ttl_are_read() -> None:
    fleet = one_vm("  - {service: web, port: 8080}\n",
                   all_vars="mesh_consul_url: https://consul:8501\nmesh_state_dir: st\nmesh_cert_ttl: 90m\n")
    settings = fleet.build().settings
    assert settings.state_dir == "/srv/fleet/st"
    assert settings.cert_ttl == timedelta(minutes=90) and settings.cert_ttl_seconds == 5400


def test_cert_renew_fraction_is_read_with_half_by_default() -> None:
    assert one_vm("  - {service: web, port: 8080}\n").build().settings.cert_renew_fraction == 0.5
    fleet = one_vm("  - {service: web, port: 8080}\n",
                   all_vars="mesh_consul_url: http://c:8500\nmesh_cert_renew_fraction: 0.25\n")
    assert fleet.build().settings.cert_renew_fraction == 0.25


def test_consul_url_is_required_with_workloads() -> None:
    errors = one_vm("  - {service: web, port: 8080}\n", all_vars="mesh_trust_domain: lab.mesh\n").errors()
    find(errors, "host_vars/vm1.yml", 1, "mesh_consul_url", "required")


def test_consul_url_is_not_required_without_workloads() -> None:
    assert Fleet("").controller().build().settings.consul_url is None


@pytest.mark.parametrize("url", ["10.77.0.2:8500", "ftp://consul", "http://", "http://consul:99999", "8500"])
def test_consul_url_must_be_a_url(url: str) -> None:
    errors = one_vm("  - {service: web, port: 8080}\n", all_vars=f"x: 1\nmesh_consul_url: '{url}'\n").errors()
    find(errors, "group_vars/all.yml", 2, "mesh_consul_url", "URL")


@pytest.mark.parametrize(("line", "fragment"), [("mesh_trust_domain: Lab_Mesh!", "trust domain"),
                                                ("mesh_cert_ttl: 24", "duration"),
                                                ("mesh_state_dir: 7", "folder"),
                                                ("mesh_cert_renew_fraction: 1.5", "fraction"),
                                                ("mesh_cert_renew_fraction: half", "fraction"),
                                                ("mesh_known_hosts: ''", "file path")])
def test_mesh_wide_values_are_checked(line: str, fragment: str) -> None:
    errors = one_vm("  - {service: web, port: 8080}\n",
                    all_vars=f"mesh_consul_url: http://c:8500\n{line}\n").errors()
    find(errors, "group_vars/all.yml", 2, line.split(":")[0], fragment)


def test_mesh_wide_values_must_agree_across_hosts() -> None:
    fleet = one_vm("  - {service: web, port: 8080}\n").host("vm2", "mesh_consul_url: http://other:8500\n")
    find(fleet.errors(), "host_vars/vm2.yml", 1, "mesh_consul_url", "same on every host")


def test_unknown_mesh_variables_are_errors_with_did_you_mean() -> None:
    fleet = one_vm("  - {service: web, port: 8080}\n", extra="mesh_workload: []\n")
    error = find(fleet.errors(), "host_vars/vm1.yml", 1, "mesh_workload", "unknown mesh variable")
    assert "did you mean 'mesh_workloads'" in str(error)


def test_unknown_mesh_variable_in_group_vars_of_an_empty_group() -> None:
    fleet = Fleet().group_vars("empty", "mesh_trust_domian: x\n")
    error = find(fleet.errors(), "group_vars/empty.yml", 1, "mesh_trust_domian", "unknown mesh variable")
    assert "mesh_trust_domain" in str(error)


def test_mesh_controllers_as_a_variable_says_it_is_a_group() -> None:
    error = find(one_vm("  - {service: web, port: 8080}\n", extra="mesh_controllers: true\n").errors(),
                 "host_vars/vm1.yml", 1, "mesh_controllers", "unknown mesh variable")
    assert "is a group" in str(error)


# --- per host --------------------------------------------------------------------------------------------------

def test_host_kind_values() -> None:
    fleet = one_vm("  - {service: web, port: 8080}\n", extra="mesh_host_kind: containerhost\n")
    error = find(fleet.errors(), "host_vars/vm1.yml", 1, "mesh_host_kind", "vm or container_host")
    assert "did you mean 'container_host'" in str(error)


def test_workloads_and_no_controller_is_an_error_with_group_did_you_mean() -> None:
    fleet = Fleet().host("vm1", "mesh_workloads: [{service: web, port: 8080}]\n")
    fleet.host("ctl1", "", group="mesh_controler")
    error = find(fleet.errors(), "host_vars/vm1.yml", 1, "mesh_controllers", "no host in the group")
    assert "mesh_controler" in str(error)


def test_a_controller_through_a_child_group_counts() -> None:
    fleet = Fleet().host("vm1", "mesh_workloads: [{service: web, port: 8080}]\n")
    fleet.host("ctl1", "", group="ctl_east")
    fleet.data.add_child("mesh_controllers", "ctl_east")
    assert [h.name for h in fleet.build().controllers] == ["ctl1"]


def test_workloads_must_be_a_list_of_mappings() -> None:
    find(one_vm("  {service: web}\n").errors(), "host_vars/vm1.yml", 1, "mesh_workloads", "list of workloads")
    find(one_vm("  - web\n").errors(), "host_vars/vm1.yml", 2, "mesh_workloads[0]", "expected a workload")
    find(Fleet().controller().host("vm1", "mesh_workloads:\n").errors(), "host_vars/vm1.yml", 1,
         "mesh_workloads", "list of workloads")


# --- a workload ------------------------------------------------------------------------------------------------

def test_unknown_workload_key_names_its_line_and_did_you_mean() -> None:
    errors = one_vm("  - service: web\n    port: 8080\n    upstream: []\n").errors()
    error = find(errors, "host_vars/vm1.yml", 4, "mesh_workloads[0].upstream", "unknown workload key")
    assert "did you mean 'upstreams'" in str(error)


def test_service_is_required_and_a_dns_label() -> None:
    find(one_vm("  - {port: 8080}\n").errors(), "host_vars/vm1.yml", 2, "mesh_workloads[0]", "`service`")
    for name in ["Web", "web_api", "-web", "web-", "a" * 64, "web.api", "Ω"]:
        errors = one_vm(f"  - port: 8080\n    service: '{name}'\n").errors()
        find(errors, "host_vars/vm1.yml", 3, "mesh_workloads[0].service", "DNS label")
    assert one_vm("  - {service: " + "a" * 63 + ", port: 8080}\n").build().workloads[0].service == "a" * 63


def test_port_is_required_and_checked_at_its_own_line() -> None:
    find(one_vm("  - {service: web}\n").errors(), "host_vars/vm1.yml", 2, "mesh_workloads[0]", "`port`")
    errors = one_vm("  - service: a\n    port: 8080\n  - service: b\n    port: '08080'\n").errors()
    find(errors, "host_vars/vm1.yml", 5, "mesh_workloads[1].port", "leading zero")
    for bad in ["0", "65536", "true", "http", "80.5", "[80]"]:
        find(one_vm(f"  - service: web\n    port: {bad}\n").errors(), "host_vars/vm1.yml", 3,
             "mesh_workloads[0].port", "1-65535")


def test_protocols() -> None:
    for protocol in ["http", "http2", "grpc", "tcp"]:
        assert one_vm(f"  - {{service: w, port: 80, protocol: {protocol}}}\n").build().workloads[0].protocol == protocol
    error = find(one_vm("  - service: w\n    port: 80\n    protocol: htttp\n").errors(), "host_vars/vm1.yml", 4,
                 "mesh_workloads[0].protocol", "http, http2, grpc, tcp")
    assert "did you mean 'http'" in str(error)


def test_version_is_a_label() -> None:
    assert one_vm("  - {service: w, port: 80, version: v2}\n").build().workloads[0].version == "v2"
    find(one_vm("  - service: w\n    port: 80\n    version: 2\n").errors(), "host_vars/vm1.yml", 4,
         "mesh_workloads[0].version", "version label")


@pytest.mark.parametrize(
    ("health", "kind", "path", "interval"),
    [("{http: /healthz}", "http", "/healthz", 5), ("{grpc: true}", "grpc", None, 5),
     ("{tcp: true, interval: 10s, timeout: 2s}", "tcp", None, 10)],
)
def test_health_forms(health: str, kind: str, path: str | None, interval: int) -> None:
    check = one_vm(f"  - {{service: w, port: 80, health: {health}}}\n").build().workloads[0].health
    assert (check.kind, check.http_path, check.interval) == (kind, path, timedelta(seconds=interval))


@pytest.mark.parametrize(
    ("health", "line", "key", "fragment"),
    [("\n      http: healthz", 5, "mesh_workloads[0].health.http", "starting with '/'"),
     ("\n      grpc: false", 5, "mesh_workloads[0].health.grpc", "`grpc: true`"),
     ("\n      tcp: yes please", 5, "mesh_workloads[0].health.tcp", "`tcp: true`"),
     ("\n      tcp: true\n      http: /x", 5, "mesh_workloads[0].health", "exactly one"),
     (" {}", 4, "mesh_workloads[0].health", "exactly one"),
     (" /healthz", 4, "mesh_workloads[0].health", "{http: /path}"),
     ("\n      tcp: true\n      interval: 5", 6, "mesh_workloads[0].health.interval", "duration"),
     ("\n      tcp: true\n      timeout: 5 s", 6, "mesh_workloads[0].health.timeout", "duration"),
     ("\n      tcp: true\n      intervall: 5s", 6, "mesh_workloads[0].health.intervall", "did you mean 'interval'")],
)
def test_health_refusals(health: str, line: int, key: str, fragment: str) -> None:
    errors = one_vm(f"  - service: w\n    port: 80\n    health:{health}\n").errors()
    find(errors, "host_vars/vm1.yml", line, key, fragment)


def test_upstreams_name_a_service_some_host_runs() -> None:
    errors = one_vm("  - service: web\n    port: 80\n    upstreams:\n      - {service: wbe, local_port: 9000}\n"
                    ).errors()
    error = find(errors, "host_vars/vm1.yml", 5, "mesh_workloads[0].upstreams[0].service", "no host runs")
    assert "did you mean 'web'" in str(error)


def test_upstream_keys_and_values() -> None:
    errors = one_vm("  - service: web\n    port: 80\n    upstreams:\n      - service: web\n        localport: 9000\n"
                    ).errors()
    error = find(errors, "host_vars/vm1.yml", 6, "mesh_workloads[0].upstreams[0].localport", "unknown upstream key")
    assert "did you mean 'local_port'" in str(error)
    find(errors, "host_vars/vm1.yml", 5, "mesh_workloads[0].upstreams[0]", "`local_port`")
    errors = one_vm("  - service: web\n    port: 80\n    upstreams:\n      - {service: web, local_port: 070}\n"
                    ).errors()
    find(errors, "host_vars/vm1.yml", 5, "mesh_workloads[0].upstreams[0].local_port", "1-65535")
    errors = one_vm("  - {service: web, port: 80, upstreams: {service: web}}\n").errors()
    find(errors, "host_vars/vm1.yml", 2, "mesh_workloads[0].upstreams", "list of")


def test_container_is_refused_on_a_vm() -> None:
    errors = one_vm("  - service: web\n    port: 80\n    container: web-1\n").errors()
    find(errors, "host_vars/vm1.yml", 4, "mesh_workloads[0].container", "container hosts only")


def test_container_is_required_on_a_container_host() -> None:
    fleet = Fleet().controller().host("dock1", "mesh_host_kind: container_host\nmesh_workloads:\n"
                                               "  - {service: web, port: 80}\n")
    find(fleet.errors(), "host_vars/dock1.yml", 3, "mesh_workloads[0]", "needs `container`")
    fleet = Fleet().controller().host("dock1", "mesh_host_kind: container_host\nmesh_workloads:\n"
                                               "  - {service: web, port: 80, container: 'bad name'}\n")
    find(fleet.errors(), "host_vars/dock1.yml", 3, "mesh_workloads[0].container", "container name")


# --- ports and network namespaces -------------------------------------------------------------------------------

def test_vm_ports_are_distinct_across_keys_and_defaults() -> None:
    errors = one_vm("  - {service: a, port: 8080}\n  - {service: b, port: 8080}\n").errors()
    find(errors, "host_vars/vm1.yml", 3, "mesh_workloads[1].port", "already used by mesh_workloads[0].port")
    errors = one_vm("  - {service: a, port: 21001}\n  - {service: b, port: 9000}\n").errors()
    find(errors, "host_vars/vm1.yml", 3, "mesh_workloads[1].proxy_port", "(its default)")
    errors = one_vm("  - service: a\n    port: 8080\n    upstreams: [{service: a, local_port: 8080}]\n").errors()
    find(errors, "host_vars/vm1.yml", 4, "mesh_workloads[0].upstreams[0].local_port", "already used")
    errors = one_vm("  - {service: a, port: 8080, admin_port: 9000}\n  - {service: b, port: 9000}\n").errors()
    find(errors, "host_vars/vm1.yml", 3, "mesh_workloads[1].port", "already used by mesh_workloads[0].admin_port")


def test_each_container_is_its_own_namespace_and_proxy_ports_are_unique_on_the_host() -> None:
    text = ("mesh_host_kind: container_host\nmesh_workloads:\n"
            "  - {service: a, port: 8080, container: a1, upstreams: [{service: b, local_port: 9000}]}\n"
            "  - {service: b, port: 8080, container: b1, upstreams: [{service: a, local_port: 9000}]}\n")
    mesh = Fleet().controller().host("dock1", text).build()
    assert [w.port for w in mesh.workloads] == [8080, 8080]
    text = ("mesh_host_kind: container_host\nmesh_workloads:\n"
            "  - {service: a, port: 8080, container: a1}\n"
            "  - {service: b, port: 8080, container: a1}\n")
    find(Fleet().controller().host("dock1", text).errors(), "host_vars/dock1.yml", 4, "mesh_workloads[1].port",
         "in container a1")
    text = ("mesh_host_kind: container_host\nmesh_workloads:\n"
            "  - {service: a, port: 8080, container: a1, proxy_port: 30000}\n"
            "  - {service: b, port: 8080, container: b1, proxy_port: 30000}\n")
    find(Fleet().controller().host("dock1", text).errors(), "host_vars/dock1.yml", 4,
         "mesh_workloads[1].proxy_port", "on container host dock1")


@pytest.mark.parametrize(("extra", "port"), [("", 22), ("ansible_port: 2222\n", 2222), ("ansible_port: '2222'\n", 2222)])
def test_no_port_is_the_ssh_port(extra: str, port: int) -> None:
    errors = one_vm(f"  - {{service: a, port: {port}}}\n", extra=extra).errors()
    find(errors, "host_vars/vm1.yml", 3 if extra else 2, "mesh_workloads[0].port", "SSH port")


# --- connection variables ---------------------------------------------------------------------------------------

def test_connection_is_read() -> None:
    extra = ("ansible_host: 10.0.0.5\nansible_port: '2200'\nansible_user: deploy\n"
             "ansible_ssh_private_key_file: ~/.ssh/mesh\nansible_become: 'yes'\nansible_become_user: admin\n"
             "ansible_become_method: sudo\nansible_connection: ssh\nansible_python_interpreter: /usr/bin/python3\n"
             "ansible_ssh_common_args: -o UserKnownHostsFile=/srv/kh -o ProxyJump=bastion "
             "-o StrictHostKeyChecking=yes -o ControlMaster=auto\n")
    connection = one_vm("  - {service: a, port: 80}\n", extra=extra).build().host("vm1").connection
    assert (connection.address, connection.port, connection.user) == ("10.0.0.5", 2200, "deploy")
    assert connection.private_key_file == "~/.ssh/mesh"
    assert (connection.become, connection.become_user, connection.local) == (True, "admin", False)
    assert (connection.known_hosts, connection.proxy_jump) == ("/srv/kh", "bastion")


def test_known_hosts_from_extra_args_and_mesh_known_hosts() -> None:
    fleet = one_vm("  - {service: a, port: 80}\n", extra="ansible_ssh_extra_args: '-o UserKnownHostsFile=/k'\n",
                   all_vars="mesh_consul_url: http://c:8500\nmesh_known_hosts: /etc/mesh/known_hosts\n")
    mesh = fleet.build()
    assert mesh.host("vm1").connection.known_hosts == "/k"
    assert mesh.host("ctl1").connection.known_hosts == "/etc/mesh/known_hosts"
    assert mesh.settings.known_hosts == "/etc/mesh/known_hosts"


def test_local_connection() -> None:
    mesh = Fleet().controller("ctl1", "ansible_connection: local\n").build()
    assert mesh.host("ctl1").connection.local and mesh.host("ctl1").connection.address == "ctl1"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [("ansible_password: s3cret", "passwords"), ("ansible_ssh_pass: s3cret", "passwords"),
     ("ansible_become_password: s3cret", "passwords"), ("ansible_become_pass: s3cret", "passwords"),
     ("ansible_become_method: su", "sudo"), ("ansible_connection: winrm", "'winrm'"),
     ("ansible_connection: paramiko", "'paramiko'"), ("ansible_winrm_transport: ntlm", "connection"),
     ("ansible_become_exe: doas", "sudo only"), ("ansible_ssh_executable: /opt/ssh", "SSH client"),
     ("ansible_host: 10.0.0.5:2222", "ansible_port"), ("ansible_host: '[::1]:22'", "no port"),
     ("ansible_port: '022'", "leading zero"), ("ansible_port: 0", "1-65535"), ("ansible_port: ssh", "1-65535"),
     ("ansible_become: maybe", "boolean"), ("ansible_user: 1000", "user name"),
     ("ansible_ssh_common_args: -o StrictHostKeyChecking=no", "StrictHostKeyChecking must be yes"),
     ("ansible_ssh_extra_args: -o ProxyCommand=nc", "'ProxyCommand'"),
     ("ansible_ssh_common_args: -p 2222", "-o Option=value")],
)
def test_connection_refusals_name_the_variable(line: str, fragment: str) -> None:
    errors = one_vm("  - {service: a, port: 80}\n", extra=line + "\n").errors()
    find(errors, "host_vars/vm1.yml", 1, line.split(":")[0], fragment)


def test_ipv6_ansible_host_is_an_address() -> None:
    mesh = one_vm("  - {service: a, port: 80}\n", extra="ansible_host: 'fd00::11'\n").build()
    assert mesh.host("vm1").connection.address == "fd00::11"


def test_connection_of_a_controller_is_checked_too() -> None:
    fleet = one_vm("  - {service: a, port: 80}\n").host("ctl2", "ansible_ssh_pass: x\n", group="mesh_controllers")
    find(fleet.errors(), "host_vars/ctl2.yml", 1, "ansible_ssh_pass", "passwords")


# --- all errors at once, templates ----------------------------------------------------------------------------

def test_every_error_is_reported_in_one_pass() -> None:
    errors = one_vm("  - {service: Web, port: 0, protocol: udp}\n", extra="ansible_password: x\n").errors()
    keys = {error.key for error in errors}
    assert {"mesh_workloads[0].service", "mesh_workloads[0].port", "mesh_workloads[0].protocol",
            "ansible_password"} <= keys


def test_templated_values_are_rendered_with_native_types() -> None:
    fleet = one_vm("  - {service: web, port: '{{ base_port + 1 }}'}\n", extra="base_port: 8079\n",
                   all_vars="consul_ip: 10.0.0.2\nmesh_consul_url: 'http://{{ consul_ip }}:8500'\n")
    mesh = fleet.build()
    assert mesh.workloads[0].port == 8080
    assert mesh.settings.consul_url == "http://10.0.0.2:8500"


def test_a_template_error_is_placed_at_the_nested_line() -> None:
    errors = one_vm("  - service: web\n    port: \"{{ lookup('env', 'PORT') }}\"\n").errors()
    find(errors, "host_vars/vm1.yml", 3, "mesh_workloads[0].port", "Ansible lookup")


def test_build_mesh_uses_the_given_vars_of() -> None:
    fleet = one_vm("  - {service: web, port: 8080}\n")

    def vars_of(data: InventoryData, host: str) -> dict[str, Var]:
        found = dict(host_vars_with_origins(data, host))
        found["mesh_trust_domain"] = Var("given.mesh", Origin("given.yml", 1))
        return found

    mesh = build_mesh(fleet.data, "/srv/fleet/inventory.yml", vars_of=vars_of)
    assert mesh.workloads[0].spiffe_id == "spiffe://given.mesh/svc/web"


def test_only_managed_host_names_are_judged() -> None:
    fleet = Fleet().controller().host("vm1", "mesh_workloads: [{service: web, port: 8080}]\n", group="vms")
    fleet.host("consul server\n(left alone)", "x: 1\n")
    assert [host.name for host in fleet.build().hosts] == ["ctl1", "vm1"]
    fleet.host("vm2\nflush ruleset\n#", "mesh_workloads: [{service: api, port: 9090}]\n", group="vms")
    find(fleet.errors(), INVENTORY, 1, "host 'vm2\\nflush ruleset\\n#'", "letters, digits")


def test_both_address_variables_are_checked() -> None:
    fleet = Fleet().controller().host("vm1", "ansible_host: \"10.0.0.1\\n\"\nansible_ssh_host: 10.0.0.1\n"
                                             "mesh_workloads: [{service: web, port: 8080}]\n", group="vms")
    find(fleet.errors(), "host_vars/vm1.yml", 1, "ansible_host", "host name or IP address")


def test_workload_and_policy_durations_share_one_grammar() -> None:
    """A health check's `interval: 500ms` reads as a policy's `timeout: 500ms` does (one grammar); each keeps its
    own bounds (whole numbers for workloads, at most 24h and no days for policies)."""
    from mesh.inventory.policy_values import parse_millis

    assert parse_duration("500ms") == timedelta(milliseconds=500) and parse_millis("500ms") == 500
    assert parse_duration("1m30s") == timedelta(seconds=90) and parse_millis("1m30s") == 90_000
