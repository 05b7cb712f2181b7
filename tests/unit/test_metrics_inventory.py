"""The inventory side of issue 19's metrics ports: the workload key `metrics_port` (a port of the workload's
namespace, forwarded from a container host's own address) and `mesh_metrics_scrapers` (host and group names read
into the addresses that alone, with the controllers', may reach a metrics port), with the errors a user sees.
One test asks the real `ansible` how it reads the same inventory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from meshvars_helpers import Fleet, find

from mesh.errors import InventoryErrors
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.inventory.values import BadValue, check_metrics_source

CONSUL = "mesh_consul_url: http://10.77.0.2:8500\n"
WEB = "ansible_host: 10.77.0.11\nmesh_workloads:\n  - {service: web, port: 8080}\n"


def fleet(scrapers: str | None, *hosts: tuple[str, str, str]) -> Fleet:
    """A controller (ctl1), vm1 running web, and hosts (name, host_vars text, group); scrapers is the YAML value
    of mesh_metrics_scrapers (None: unset)."""
    built = Fleet(CONSUL + (f"mesh_metrics_scrapers: {scrapers}\n" if scrapers is not None else ""))
    built.controller().host("vm1", WEB, "vms")
    for name, text, group in hosts:
        built.host(name, text, group)
    return built


def monitoring(fleet_: Fleet) -> Fleet:
    """Groups monitoring -> (prometheus: prom2, prom1; grafana: graf1), children before hosts, as in an inventory."""
    fleet_.data.add_group("monitoring", fleet_.data.groups["all"].origin)
    fleet_.data.add_child("all", "monitoring")
    for child in ("prometheus", "grafana"):
        fleet_.data.add_group(child, fleet_.data.groups["all"].origin)
        fleet_.data.add_child("monitoring", child)
    fleet_.host("prom2", "ansible_host: 'fd00::9'\n", "prometheus").host("prom1", "ansible_host: 10.77.0.50\n",
                                                                          "prometheus")
    return fleet_.host("graf1", "ansible_host: graf.example.internal\n", "grafana")


# --- metrics_port ------------------------------------------------------------------------------------------------

def test_metrics_port_defaults_to_20000_plus_the_index_and_can_be_pinned() -> None:
    text = ("ansible_host: 10.77.0.11\nmesh_workloads:\n  - {service: web, port: 8080}\n"
            "  - {service: api, port: 9090, metrics_port: 29100}\n  - {service: db, port: 5432}\n")
    mesh = Fleet().controller().host("vm1", text).build()
    assert [w.metrics_port for w in mesh.workloads] == [20000, 29100, 20002]


@pytest.mark.parametrize(("value", "fragment"), [("'0'", "1-65535"), ("70000", "out of range"), ("020000", "YAML 1.1"),
                                                 ("metrics", "a port"), ("true", "a port")])
def test_metrics_port_is_a_port(value: str, fragment: str) -> None:
    errors = fleet(None, ("vm2", f"mesh_workloads:\n  - service: api\n    port: 9090\n    metrics_port: {value}\n",
                          "vms")).errors()
    find(errors, "host_vars/vm2.yml", 4, "mesh_workloads[0].metrics_port", fragment)


def test_a_misspelled_metrics_port_says_did_you_mean() -> None:
    errors = fleet(None, ("vm2", "mesh_workloads:\n  - {service: api, port: 9090, metrics_prot: 20100}\n",
                          "vms")).errors()
    error = find(errors, "host_vars/vm2.yml", 2, "mesh_workloads[0].metrics_prot", "unknown workload key")
    assert "did you mean 'metrics_port'" in str(error)


def test_metrics_port_is_distinct_in_a_vm_from_every_other_port_and_default() -> None:
    errors = fleet(None, ("vm2", "mesh_workloads:\n  - {service: api, port: 20001}\n  - {service: db, port: 5432}\n",
                          "vms")).errors()
    # db's default metrics port (20000 + 1) is api's app port
    find(errors, "host_vars/vm2.yml", 3, "mesh_workloads[1].metrics_port", "port 20001 (its default) is already "
                                                                           "used by mesh_workloads[0].port")
    errors = fleet(None, ("vm2", "mesh_workloads:\n  - {service: api, port: 9090, metrics_port: 21000}\n",
                          "vms")).errors()
    find(errors, "host_vars/vm2.yml", 2, "mesh_workloads[0].metrics_port", "already used by mesh_workloads[0].proxy_port")


def test_metrics_port_is_never_the_ssh_port() -> None:
    errors = fleet(None, ("vm2", ("ansible_port: 2222\nmesh_workloads:\n"
                                 "  - {service: api, port: 9090, metrics_port: 2222}\n"), "vms")).errors()
    find(errors, "host_vars/vm2.yml", 3, "mesh_workloads[0].metrics_port", "SSH port")


CONTAINERS = "ansible_host: 10.77.0.20\nmesh_host_kind: container_host\nmesh_workloads:\n"


def test_on_a_container_host_metrics_and_proxy_ports_are_unique_on_the_host() -> None:
    # two containers are two namespaces: the same app port is fine, so is a metrics port equal to another's app port
    ok = CONTAINERS + ("  - {service: a, port: 8080, container: a1}\n"
                       "  - {service: b, port: 20000, container: b1}\n")
    mesh = fleet(None, ("dock1", ok, "containers")).build()
    assert [(w.container, w.proxy_port, w.metrics_port) for w in mesh.workloads if w.container] == [
        ("a1", 21000, 20000), ("b1", 21001, 20001)]
    # but both forwarded ports come from the host's own address
    clash = CONTAINERS + ("  - {service: a, port: 8080, container: a1, metrics_port: 20100}\n"
                          "  - {service: b, port: 8080, container: b1, metrics_port: 20100}\n")
    error = find(fleet(None, ("dock1", clash, "containers")).errors(), "host_vars/dock1.yml", 5,
                 "mesh_workloads[1].metrics_port", "on container host dock1")
    assert "both are forwarded from the host's own address" in str(error)
    clash = CONTAINERS + ("  - {service: a, port: 8080, container: a1, proxy_port: 20001}\n"
                          "  - {service: b, port: 8080, container: b1}\n")
    find(fleet(None, ("dock1", clash, "containers")).errors(), "host_vars/dock1.yml", 5,
         "mesh_workloads[1].metrics_port", "port 20001 (its default) is already used by mesh_workloads[0].proxy_port")


def test_a_port_clash_in_one_container_is_reported_once() -> None:
    clash = CONTAINERS + ("  - {service: a, port: 8080, container: a1, metrics_port: 20100}\n"
                          "  - {service: b, port: 9090, container: a1, metrics_port: 20100}\n")
    errors = [e for e in fleet(None, ("dock1", clash, "containers")).errors() if e.key == "mesh_workloads[1].metrics_port"]
    assert len(errors) == 1 and "in container a1 on dock1" in str(errors[0])


# --- mesh_metrics_scrapers ---------------------------------------------------------------------------------------

def test_unset_means_only_the_controllers() -> None:
    mesh = fleet(None).build()
    assert mesh.metrics_scrapers == () and mesh.metrics_sources == ("10.77.0.3",)


def test_groups_expand_recursively_in_ansible_order_hosts_are_themselves_and_duplicates_go() -> None:
    mesh = monitoring(fleet("[monitoring, vm1, prom1, ctl1]")).build()
    assert mesh.metrics_scrapers == ("fd00::9", "10.77.0.50", "graf.example.internal", "10.77.0.11", "10.77.0.3")
    # the controller is a scraper too: listed once
    assert mesh.metrics_sources == mesh.metrics_scrapers
    assert monitoring(fleet("[grafana]")).build().metrics_sources == ("graf.example.internal", "10.77.0.3")


def test_an_empty_group_and_an_empty_list_allow_no_one_else() -> None:
    built = fleet("[]")
    assert built.build().metrics_scrapers == ()
    built = fleet("[nobody]")
    built.data.add_group("nobody", built.data.groups["all"].origin)
    assert built.build().metrics_sources == ("10.77.0.3",)


def test_the_address_is_ansible_ssh_host_then_ansible_host_then_the_name() -> None:
    mesh = fleet("[prom1, prom2, prom3]", ("prom1", "ansible_ssh_host: 10.0.0.1\nansible_host: 10.0.0.2\n", "m"),
                 ("prom2", "ansible_host: 10.0.0.2\n", "m"), ("prom3", "", "m")).build()
    assert mesh.metrics_scrapers == ("10.0.0.1", "10.0.0.2", "prom3")


def test_an_unknown_name_says_did_you_mean() -> None:
    errors = monitoring(fleet("[ctl1, monitorng]")).errors()
    error = find(errors, "group_vars/all.yml", 2, "mesh_metrics_scrapers[1]", "no host or group of the inventory "
                                                                             "is named 'monitorng'")
    assert "did you mean 'monitoring'" in str(error)


@pytest.mark.parametrize(("value", "key", "fragment"), [
    ("monitoring", "mesh_metrics_scrapers", "expected a list of inventory host or group names"),
    ("{monitoring: true}", "mesh_metrics_scrapers", "expected a list"),
    ("[3]", "mesh_metrics_scrapers[0]", "expected a host or group name, got 3 (int)"),
    ("['']", "mesh_metrics_scrapers[0]", "expected a host or group name"),
    ("[[monitoring]]", "mesh_metrics_scrapers[0]", "expected a host or group name"),
])
def test_not_a_list_of_names_is_an_error(value: str, key: str, fragment: str) -> None:
    find(monitoring(fleet(value)).errors(), "group_vars/all.yml", 2, key, fragment)


def test_a_string_says_where_a_list_can_be_written() -> None:
    error = find(monitoring(fleet("monitoring")).errors(), "group_vars/all.yml", 2, "mesh_metrics_scrapers",
                 "got 'monitoring'")
    assert "group_vars/all.yml" in str(error.hint)


def test_every_host_must_agree_on_it() -> None:
    built = monitoring(fleet("[monitoring]"))
    built.host("vm3", "mesh_metrics_scrapers: [grafana]\n", "vms")
    find(built.errors(), "host_vars/vm3.yml", 1, "mesh_metrics_scrapers", "must be the same on every host")


@pytest.mark.parametrize("address", [
    "10.77.0.50 } accept; flush ruleset", "10.77.0.50\nflush ruleset", "prom'$(reboot)'", "prom,1", "prom;1",
    "prom 1", "{prom}", "fe80::1%eth0", "10.0.0.0/8", "10.0.0.300", "-prom", "prom..example", "prom_1",
    "prom.example.", "a" * 254,
])
def test_a_scraper_address_that_is_not_an_address_or_plain_name_is_refused(address: str) -> None:
    errors = fleet("[monitoring]", ("prom1", f"ansible_host: {json.dumps(address)}\n", "monitoring")).errors()
    error = find(errors, "host_vars/prom1.yml", 1, "ansible_host", "prom1 is a metrics scraper")
    assert "mesh_metrics_scrapers[0] 'monitoring'" in str(error)
    assert "expected an IPv4 or IPv6 address, or a host name of letters, digits, '-' and '.'" in str(error)


def test_a_scraper_named_by_a_name_that_is_no_address_is_refused_at_the_host() -> None:
    built = fleet("[prom_1]", ("prom_1", "", "monitoring"))
    error = find(built.errors(), "inventory.yml", 1, "host 'prom_1'", "prom_1 is a metrics scraper")
    assert "ansible_host" in str(error.hint)


@pytest.mark.parametrize("address", ["10.0.0.9", "fd00::9", "::ffff:10.0.0.9", "prom-1.example.internal",
                                     "PROM1", "localhost"])
def test_good_sources(address: str) -> None:
    assert check_metrics_source(address) == address


@pytest.mark.parametrize("value", [None, 10, ["10.0.0.9"], ""])
def test_a_source_is_a_string(value: object) -> None:
    with pytest.raises(BadValue):
        check_metrics_source(value)


def test_a_controller_address_is_checked_as_a_metrics_source_when_metrics_ports_exist() -> None:
    text = "ansible_host: 'fe80::3%eth0'\n"
    built = Fleet(CONSUL).controller("ctl1", text).host("vm1", WEB, "vms")
    find(built.errors(), "host_vars/ctl1.yml", 1, "ansible_host", "ctl1 is a controller (it may reach every "
                                                                  "metrics port)")
    # no workload: no metrics port, and the address is only an SSH address
    assert Fleet(CONSUL).controller("ctl1", text).build().controllers[0].connection.address == "fe80::3%eth0"


def test_a_controller_address_refused_as_an_ssh_address_is_reported_once() -> None:
    built = Fleet(CONSUL).controller("ctl1", "ansible_host: '10.77.0.3;reboot'\n").host("vm1", WEB, "vms")
    errors = [error for error in built.errors() if error.key == "ansible_host"]
    assert len(errors) == 1 and "host name or IP address" in str(errors[0])


# --- as Ansible reads it -----------------------------------------------------------------------------------------

INI = """[mesh_controllers]
ctl1 ansible_host=10.77.0.3

[monitoring:children]
prometheus
grafana

[prometheus]
prom2 ansible_host=fd00::9
prom1 ansible_host=10.77.0.50

[grafana]
graf1 ansible_ssh_host=graf.example.internal ansible_host=10.77.0.60

[vms]
vm1 ansible_host=10.77.0.11

[all:vars]
mesh_consul_url=http://10.77.0.2:8500
"""


def _ansible_view(inventory: Path, workdir: Path) -> dict[str, object]:
    """What Ansible itself makes of the inventory, seen from vm1: the value of mesh_metrics_scrapers, `groups`,
    and each host's address variables."""
    ansible = Path(sys.executable).parent / "ansible"
    expression = ("{{ {'value': mesh_metrics_scrapers, 'groups': groups, 'addresses': dict(groups['all'] | "
                  "zip(groups['all'] | map('extract', hostvars) | map(attribute='ansible_ssh_host', default='') "
                  "| zip(groups['all'] | map('extract', hostvars) | map(attribute='ansible_host', default=''))))} }}")
    env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_DEPRECATION_WARNINGS": "false", "ANSIBLE_LOCALHOST_WARNING": "false"}
    done = subprocess.run([str(ansible), "-i", str(inventory), "vm1", "-m", "debug", "-a", f"msg={expression}"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout.split("=>", 1)[1])
    return dict(answer["msg"])


def _addresses(view: dict[str, object]) -> tuple[str, ...]:
    """The scrapers' addresses computed from Ansible's own view (groups first, as in its host patterns)."""
    groups, addresses = view["groups"], view["addresses"]
    assert isinstance(groups, dict) and isinstance(addresses, dict) and isinstance(view["value"], list)
    found: dict[str, None] = {}
    for name in view["value"]:
        for host in groups.get(name, [name]):
            ssh_host, ansible_host = addresses[host]
            found[ssh_host or ansible_host or host] = None
    return tuple(found)


def test_mesh_reads_the_scrapers_as_ansible_does(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "host_vars").mkdir()
    (inventory / "hosts.ini").write_text(INI)
    (inventory / "group_vars" / "all.yml").write_text("mesh_metrics_scrapers: [monitoring, vm1, ctl1, prom1]\n")
    (inventory / "host_vars" / "vm1.yml").write_text("mesh_workloads:\n  - {service: web, port: 8080}\n")
    workdir = tmp_path / "empty"  # ansible reads ./group_vars too: run it where there is none
    workdir.mkdir()
    view = _ansible_view(inventory, workdir)
    mesh = build_mesh(load_inventory(str(inventory)), str(inventory))
    assert mesh.metrics_scrapers == _addresses(view)
    assert mesh.metrics_scrapers == ("fd00::9", "10.77.0.50", "graf.example.internal", "10.77.0.11", "10.77.0.3")


def test_an_ini_vars_value_is_a_string_for_ansible_and_refused_by_mesh(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(INI.replace("[vms]\nvm1 ansible_host=10.77.0.11",
                                     "[vms]\nvm1 ansible_host=10.77.0.11 mesh_workloads=\"[{'service': 'web', "
                                     "'port': 8080}]\"") + "mesh_metrics_scrapers=monitoring\n")
    workdir = tmp_path / "empty"
    workdir.mkdir()
    assert _ansible_view(inventory, workdir)["value"] == "monitoring"
    with pytest.raises(InventoryErrors) as caught:
        build_mesh(load_inventory(str(inventory)), str(inventory))
    assert [(e.origin.line, e.key) for e in caught.value.errors] == [(20, "mesh_metrics_scrapers")]
    assert "expected a list" in str(caught.value)
