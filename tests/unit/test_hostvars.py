"""The runner's magic variables cannot be overridden by the inventory, as in Ansible (where `group_names`,
`inventory_hostname` and `ansible_check_mode` from an inventory lose to the magic values, with a warning)."""

from __future__ import annotations

import json
from pathlib import Path

from meshvars_helpers import Fleet
from runner_helpers import managed, run

from mesh.deploy.hostvars import RUNNER_MAGIC, inventory_vars
from mesh.inventory.resolve import host_vars_with_origins
from mesh.inventory.templating import Templating
from mesh.testing.fake_connector import FakeFleet

OVERRIDES = """\
inventory_hostname: evil
inventory_hostname_short: evil
group_names: [evil]
groups: {evil: [evil]}
playbook_dir: /evil
ansible_check_mode: true
ansible_host: evil.example.com
own: mine
"""
PLAYBOOK = """\
- hosts: all
  tasks:
    - copy:
        dest: /tmp/magic.json
        content: >-
          {{ {'inventory_hostname': inventory_hostname, 'short': inventory_hostname_short,
              'group_names': group_names, 'groups': groups | list | sort, 'playbook_dir': playbook_dir,
              'check': ansible_check_mode, 'ansible_host': ansible_host, 'own': own} | to_json }}
"""


def test_the_runner_magic_wins_over_the_inventory(tmp_path: Path) -> None:
    fleet = Fleet("").host("vm1", OVERRIDES, group="web")
    variables = inventory_vars(fleet.data)
    hosts = managed("vm1")
    fake = FakeFleet()
    done = run(tmp_path, PLAYBOOK, fake, hosts, host_vars=variables.host_vars,
               groups={"mesh_vms": ["vm1"]})
    assert done.code == 0, done.output
    seen = json.loads(fake.host("vm1").files["/tmp/magic.json"].data or b"")
    assert seen == {"inventory_hostname": "vm1", "short": "vm1", "group_names": ["mesh_vms"],
                    "groups": ["all", "mesh_vms"], "playbook_dir": str(tmp_path), "check": False,
                    "ansible_host": hosts[0].connection.address, "own": "mine"}


def test_inventory_templates_see_the_magic_values_too() -> None:
    fleet = Fleet("").host("vm1", OVERRIDES + "who: '{{ inventory_hostname }} in {{ group_names }}'\n", group="web")
    templating = Templating(fleet.data, lambda host: host_vars_with_origins(fleet.data, host))
    assert templating.render("vm1", "who") == "vm1 in ['web']"


def test_runner_magic_hidden_from_the_inventory_view() -> None:
    fleet = Fleet("").host("vm1", OVERRIDES, group="web")
    scope = inventory_vars(fleet.data).host_vars["vm1"]
    assert not RUNNER_MAGIC & set(scope)
    assert "own" in scope and "hostvars" in scope
    assert "ansible_check_mode" not in scope and "group_names" not in scope
